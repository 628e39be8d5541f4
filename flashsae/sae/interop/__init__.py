"""Interop with SAELens and sparsify: checkpoint export / import, and our ops inside their SAEs.

- `export_saelens` / `import_saelens`: SAELens ``topk`` directories (``cfg.json`` + ``sae_weights.safetensors``).
- `export_sparsify` / `import_sparsify`: sparsify ``SparseCoder`` directories (``cfg.json`` + ``sae.safetensors``).
- `patch_saelens` / `patch_sparsify`: swap a peer SAE's encode / decode for `flashsae.ops` in place,
  so the peer's own loss, trainer and optimizer run on our kernels; `unpatch` undoes it.

Exporting and importing need neither peer package installed; patching works on their objects.
"""
from ._common import NORM_SCALE_KEY
from .patching import unpatch
from .saelens import export_saelens, import_saelens
from .saelens_patch import patch_saelens
from .sparsify import export_sparsify, import_sparsify
from .sparsify_patch import patch_sparsify

__all__ = [
    "NORM_SCALE_KEY",
    "export_saelens",
    "import_saelens",
    "patch_saelens",
    "export_sparsify",
    "import_sparsify",
    "patch_sparsify",
    "unpatch",
]
