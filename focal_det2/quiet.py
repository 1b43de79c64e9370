"""
Third-party deprecation noise that focal_det2's scripts hide. Imports only
:mod:`warnings`: ``focal_det2/__init__.py`` calls
:func:`hide_third_party_deprecations` inside ``warnings.catch_warnings()``
while it imports fvcore and Detectron2 (whose imports call
``torch.jit.script``), so importing the package changes no filter; the
scripts call it again to keep Detectron2's run-time noise out of their logs.
"""

import warnings

__all__ = ["hide_third_party_deprecations"]


def hide_third_party_deprecations(*, export: bool = False):
    """
    Hide, by message and module, the deprecation warnings that fvcore, Detectron2
    and torch print for calls we do not make ourselves; every other warning still
    shows. Hidden: ``torch.jit.script`` (fvcore and Detectron2 call it at import)
    and Detectron2's ``torch.meshgrid`` call without ``indexing``.

    Args:
        export (bool): also hide ``torch.jit.trace``, ``trace_method``, ``save`` and
            ``load``, which Detectron2's export (``tools/export_model.py``) needs.
    """
    if export:
        jit, module = r"(script|trace|trace_method|save|load)", r"torch\.jit\."
    else:
        jit, module = "script", r"torch\.jit\._script"
    warnings.filterwarnings("ignore", rf"`torch\.jit\.{jit}` is deprecated", FutureWarning, module)
    warnings.filterwarnings(
        "ignore", r"torch\.meshgrid: in an upcoming release", UserWarning, r"torch\.functional"
    )
