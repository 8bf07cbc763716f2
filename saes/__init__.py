"""Sparse dictionaries on a model's activations: one file per kind, found through one registry.

    base.py        what every kind shares (weights, input scale, unit-norm decoder, the MSE, one step)
    relu.py        L1 penalty, dead features resampled
    topk.py        k features per row, AuxK
    batchtopk.py   k x rows across the batch; a learned threshold in use
    jumprelu.py    a threshold per feature, L0 penalty
    matryoshka.py  batchtopk whose nested prefixes each reconstruct
    crosslayer.py  any kind as a cross-layer transcoder (every layer's features write to every later MLP)
    metrics.py     the held-out metrics under SAELens's names
    report.py      `sae.py report`: feature views, the density histogram, the feature browser
    browser.py     the feature browser page

A new kind is one file that subclasses SparseAutoencoder and is decorated with @register, and its
module added to the import line below (DEVELOPERS.md, "Add an SAE kind")."""

from __future__ import annotations

from saes.base import KINDS, SparseAutoencoder, register  # noqa: F401
from saes import relu, topk, batchtopk, jumprelu, matryoshka  # noqa: F401,E402 (each registers its kind)
from saes.crosslayer import cross_layer  # noqa: E402

ARCHS = tuple(KINDS)  # the --arch values
K_ARCHS = tuple(name for name, kind in KINDS.items() if kind.uses_k)  # sparsity set by k, dead features by AuxK
BATCH_ARCHS = tuple(name for name, kind in KINDS.items() if kind.batch_training)  # chosen across the batch


def build_sae(d: int, dict_size: int, arch: str = "relu", k: int = 32, jumprelu_init_threshold: float = 0.01,
              jumprelu_bandwidth: float = 0.05, d_out: int = 0, skip: bool = False,
              layers: int = 0) -> SparseAutoencoder:
    """A new dictionary of kind `arch` on d-wide activations with `dict_size` features (decoder rows
    random unit vectors, the encoder tied to them, biases zero). d_out > 0: a transcoder from d-wide
    inputs to d_out-wide outputs (its encoder random unit columns), with `skip` a linear skip path.
    layers > 0: a cross-layer transcoder over that many layers, d, d_out and dict_size each layer's."""
    settings = dict(k=k, jumprelu_init_threshold=jumprelu_init_threshold, jumprelu_bandwidth=jumprelu_bandwidth,
                    d_out=d_out)
    if layers:
        return cross_layer(KINDS[arch])(d, dict_size, layers=layers, **settings)
    return KINDS[arch](d, dict_size, skip=skip, **settings)
