"""The rank layout of hybrid parallelism: a (dp, pp, tp) device mesh and its three groups.

Data, pipeline and tensor parallelism combine by arranging the ``dp * pp * tp`` ranks in a
3-D grid and giving every *line* of the grid a process group: the ranks that differ only in
their ``tp`` coordinate form a tensor-parallel group, those that differ only in ``pp`` a
pipeline, those that differ only in ``dp`` a data-parallel group.  Every rank belongs to
exactly one group of each kind.  PyTorch builds this with
``torch.distributed.device_mesh.init_device_mesh`` (:func:`device_mesh`); the functions
here compute the same layout with plain arithmetic, so it can be read, drawn and checked
without starting a process.

The order of the dimensions is a decision, not a detail.  Ranks are numbered with ``tp``
innermost (row-major over ``(dp, pp, tp)``, as Megatron-LM and the DeviceMesh of
``init_device_mesh`` do)::

    rank = (dp_index * pp + pp_index) * tp + tp_index

so a tensor-parallel group is ``tp`` *consecutive* ranks -- on one node when ``tp`` divides
the GPUs per node.  That is where it must be: TP all-reduces activations in every layer,
forward and backward, with the compute waiting for them; NVLink inside a node carries ten
times what the network between nodes does.  Pipeline neighbours exchange one activation
per microbatch, point to point, and can cross nodes; the DP all-reduce of the gradients
happens once per step.  Lecture 05 puts numbers on each.
"""

from __future__ import annotations

import math
from typing import Sequence

#: The mesh's dimensions, outermost first.  ``tp`` is innermost: consecutive ranks.
DIMS = ("dp", "pp", "tp")


def check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    """``shape`` as a ``(dp, pp, tp)`` tuple of positive integers, or a ValueError that says
    what a mesh shape is."""
    try:
        values = tuple(shape)
    except TypeError:
        values = None
    if (values is None or len(values) != 3
            or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1
                       for x in values)):
        raise ValueError(f"a mesh shape is three positive whole numbers (dp, pp, tp), the "
                         f"degrees of data, pipeline and tensor parallelism, not {shape!r}")
    return values  # type: ignore[return-value]


def world_size(shape: Sequence[int]) -> int:
    """Ranks in a mesh of this shape: ``dp * pp * tp``."""
    return math.prod(check_shape(shape))


def coordinates(rank: int, shape: Sequence[int]) -> tuple[int, int, int]:
    """``(dp_index, pp_index, tp_index)`` of ``rank``: its place in the grid, tp innermost."""
    dp, pp, tp = check_shape(shape)
    if not 0 <= rank < dp * pp * tp:
        raise ValueError(f"rank {rank} is not in a mesh of {dp}x{pp}x{tp} = {dp * pp * tp} "
                         f"ranks (ranks are 0..{dp * pp * tp - 1})")
    return rank // (pp * tp), rank // tp % pp, rank % tp


def rank_of(coords: Sequence[int], shape: Sequence[int]) -> int:
    """The rank at ``(dp_index, pp_index, tp_index)``; the inverse of :func:`coordinates`."""
    dp, pp, tp = check_shape(shape)
    i, j, k = coords
    if not (0 <= i < dp and 0 <= j < pp and 0 <= k < tp):
        raise ValueError(f"coordinates {tuple(coords)} are outside a {dp}x{pp}x{tp} mesh")
    return (i * pp + j) * tp + k


def _axis(dim: str) -> int:
    if dim not in DIMS:
        raise ValueError(f"unknown mesh dimension {dim!r}; the dimensions are "
                         f"{', '.join(DIMS)}")
    return DIMS.index(dim)


def group_ranks(shape: Sequence[int], dim: str) -> list[list[int]]:
    """Every group of dimension ``dim``: the ranks that share the other two coordinates,
    ordered by their coordinate along ``dim`` (so a rank's index in its list is its rank
    in the group).  Groups are listed in the order of their first rank.

    >>> group_ranks((2, 2, 2), "tp")
    [[0, 1], [2, 3], [4, 5], [6, 7]]
    >>> group_ranks((2, 2, 2), "dp")
    [[0, 4], [1, 5], [2, 6], [3, 7]]
    """
    shape = check_shape(shape)
    axis = _axis(dim)
    groups = {}
    for rank in range(math.prod(shape)):
        coords = coordinates(rank, shape)
        key = coords[:axis] + coords[axis + 1:]
        groups.setdefault(key, []).append(rank)
    return sorted(groups.values())


def groups_of(rank: int, shape: Sequence[int]) -> dict[str, list[int]]:
    """The three groups ``rank`` belongs to: ``{"dp": [...], "pp": [...], "tp": [...]}``."""
    return {dim: next(g for g in group_ranks(shape, dim) if rank in g) for dim in DIMS}


def node_of(rank: int, gpus_per_node: int) -> int:
    """The node of ``rank`` when ranks fill nodes in order, ``gpus_per_node`` each (what
    ``torchrun --nproc-per-node`` does)."""
    return rank // gpus_per_node


def crosses_nodes(shape: Sequence[int], dim: str, gpus_per_node: int) -> bool:
    """Whether some group of dimension ``dim`` spans more than one node."""
    return any(len({node_of(r, gpus_per_node) for r in group}) > 1
               for group in group_ranks(shape, dim))


# ---------------------------------------------------------------------------------------------
# The real mesh
# ---------------------------------------------------------------------------------------------
def device_mesh(shape: Sequence[int]):
    """The world as a ``torch.distributed.DeviceMesh`` of ``shape`` with dimensions named
    ``dp``, ``pp``, ``tp`` (call it inside a rank; every rank must call it).

    ``mesh.get_group("tp")`` is this rank's tensor-parallel process group, and so on; the
    groups are exactly those of :func:`group_ranks` (the tests check it).  The mesh's
    device type is ``cuda`` under NCCL and ``cpu`` otherwise: it names where DTensor
    would compute, while the groups carry any backend's collectives."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    shape = check_shape(shape)
    world = dist.get_world_size() if dist.is_initialized() else 1
    if math.prod(shape) != world:
        raise ValueError(f"a {shape[0]}x{shape[1]}x{shape[2]} mesh (dp x pp x tp) needs "
                         f"{math.prod(shape)} ranks, but the world has {world}: the product "
                         f"of the three degrees must be the number of processes")
    device_type = "cuda" if dist.is_initialized() and dist.get_backend() == "nccl" else "cpu"
    return init_device_mesh(device_type, shape, mesh_dim_names=DIMS)


def mesh_groups(mesh) -> dict[str, list[int]]:
    """The global ranks of this rank's group in each dimension of ``mesh``, as PyTorch
    built them (``{"dp": [...], "pp": [...], "tp": [...]}``)."""
    import torch.distributed as dist

    return {dim: dist.get_process_group_ranks(mesh.get_group(dim)) for dim in DIMS}


# ---------------------------------------------------------------------------------------------
# A picture
# ---------------------------------------------------------------------------------------------
def draw(shape: Sequence[int], gpus_per_node: int, ax=None):
    """The ranks as boxes grouped by node, one row per dimension: each group of that
    dimension in its own colour.  Shows at a glance which groups stay inside a node."""
    import matplotlib.pyplot as plt

    shape = check_shape(shape)
    n = math.prod(shape)
    if ax is None:
        _, ax = plt.subplots(figsize=(max(6, 0.8 * n), 2.6))
    palette = plt.get_cmap("tab10")
    for row, dim in enumerate(DIMS):
        y = len(DIMS) - 1 - row
        for g, group in enumerate(group_ranks(shape, dim)):
            for r in group:
                ax.add_patch(plt.Rectangle((r + 0.05, y + 0.1), 0.9, 0.8,
                                           color=palette(g % 10), alpha=0.75))
                ax.text(r + 0.5, y + 0.5, str(r), ha="center", va="center", fontsize=9)
        where = "crosses nodes" if crosses_nodes(shape, dim, gpus_per_node) else "inside a node"
        ax.text(-0.2, y + 0.5, f"{dim} groups ({where})", ha="right", va="center", fontsize=9)
    for boundary in range(gpus_per_node, n, gpus_per_node):
        ax.axvline(boundary, color="black", linewidth=2)
    for node in range(math.ceil(n / gpus_per_node)):
        ax.text(node * gpus_per_node + min(gpus_per_node, n - node * gpus_per_node) / 2,
                len(DIMS) + 0.15, f"node {node}", ha="center", fontsize=9)
    ax.set_xlim(-0.1, n + 0.1)
    ax.set_ylim(0, len(DIMS) + 0.5)
    ax.axis("off")
    ax.set_title(f"mesh (dp, pp, tp) = {shape}, {gpus_per_node} GPUs per node; same colour "
                 f"= same group", fontsize=9)
    return ax
