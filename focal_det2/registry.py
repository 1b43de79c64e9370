"""Registry helpers shared by the loss, head and gamma-schedule registries."""

__all__ = ["lookup", "register_as"]


def lookup(registry, name, key, hint: str = ""):
    """
    ``registry.get(name)`` with an error that names the config key and the valid names.

    Args:
        registry (Registry): a Detectron2/fvcore registry.
        name (str): the requested name.
        key (str): the config key that holds ``name``.
        hint (str): appended to the error, e.g. how a name gets registered.
    """
    names = sorted(n for n, _ in registry)
    if name not in names:
        message = f"{key}={name!r} is not registered; valid names: {names}"
        raise ValueError(f"{message}. {hint}" if hint else message)
    return registry.get(name)


def register_as(registry, name: str):
    """
    Class decorator: registers in ``registry`` a builder ``name(cfg) -> cls(cfg)``, so
    that the config value is ``name`` (lower case, where ``@registry.register()`` takes the
    class's name). The builder's ``built_class`` is ``cls``, and ``cls.name`` is ``name``.

    Args:
        registry (Registry): a Detectron2/fvcore registry.
        name (str): the registry name, the value of the config key that chooses it.
    """

    def register(cls):
        def build(cfg):
            return cls(cfg)

        build.__name__ = build.__qualname__ = name
        build.__doc__ = f"Build :class:`{cls.__name__}` from a config."
        build.built_class = cls
        registry.register(build)
        cls.name = name
        return cls

    return register
