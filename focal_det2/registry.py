"""Registry helpers shared by the loss, head and gamma-schedule registries."""

__all__ = ["lookup"]


def lookup(registry, name, key):
    """
    ``registry.get(name)`` with an error that names the config key and the valid names.

    Args:
        registry (Registry): a Detectron2/fvcore registry.
        name (str): the requested name.
        key (str): the config key that holds ``name``.
    """
    names = sorted(n for n, _ in registry)
    if name not in names:
        raise ValueError(f"{key}={name!r} is not registered; valid names: {names}")
    return registry.get(name)
