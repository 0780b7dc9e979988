"""Layer-selection methods, one file each; importing this package registers them all.

To add a method: write `toolkit/compress/prune/methods/<name>.py` with a function decorated by
`@register_selection_method("<name>")` (see `toolkit.compress.prune.registry`), and add its import below.
"""

from toolkit.compress.prune.methods import activation, angular, block_influence, last, replace_aware

__all__ = ["activation", "angular", "block_influence", "last", "replace_aware"]
