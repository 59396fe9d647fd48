"""Device meshes, logical-axis rules, and parameters born sharded.

A mesh has three axes: ``data`` (pure data parallel), ``fsdp`` (data parallel with parameters and
optimizer state split across it) and ``tensor`` (heads / MLP columns split). Models name the axes
of every parameter and main activation logically (``embed``, ``heads``, ``act_batch``...); the
rules below map those names to mesh axes, so one model shards any way without code changes.

    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    variables = init_sharded(model, jax.random.key(0), x, mesh=mesh)
    with activate(mesh):
        logits = jax.jit(model.apply)(variables, shard_batch(x, mesh), train=False)
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

Rules = Sequence[tuple[str, Any]]

# Parameters: the model width is split over fsdp, heads / MLP columns / vocabulary over tensor.
# Activations: the batch over data x fsdp, heads and MLP columns over tensor.
DEFAULT_RULES: Rules = (
    ("act_batch", BATCH_AXES),
    ("act_len", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("classes", None),
    ("conv_in", None),
    ("conv_out", "fsdp"),
)

# FSDP only (no tensor parallelism): every large parameter dimension goes to fsdp.
FSDP_RULES: Rules = (
    ("act_batch", BATCH_AXES),
    ("act_len", None),
    ("act_embed", None),
    ("act_heads", None),
    ("act_mlp", None),
    ("embed", "fsdp"),
    ("mlp", "fsdp"),
    ("heads", "fsdp"),
    ("kv", None),
    ("vocab", "fsdp"),
    ("classes", None),
    ("conv_in", None),
    ("conv_out", "fsdp"),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes; exactly one may be -1 ("all remaining devices")."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def resolve(self, num_devices: int) -> tuple[int, int, int]:
        sizes = [self.data, self.fsdp, self.tensor]
        if sizes.count(-1) > 1:
            raise ValueError(f"at most one mesh axis may be -1, got {self}")
        if any(s == 0 or s < -1 for s in sizes):
            raise ValueError(f"mesh axis sizes must be positive or -1, got {self}")
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % known:
                raise ValueError(f"{num_devices} devices cannot be split as {self}: {known} does not divide it")
            sizes[sizes.index(-1)] = num_devices // known
        if math.prod(sizes) != num_devices:
            raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                             f"but {num_devices} are available")
        return tuple(sizes)


def make_mesh(config: MeshConfig | Mapping[str, int] | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over ``devices`` (default: all)."""
    if config is None:
        config = MeshConfig()
    elif isinstance(config, Mapping):
        unknown = set(config) - set(MESH_AXES)
        if unknown:
            raise ValueError(f"unknown mesh axes {sorted(unknown)}; expected a subset of {MESH_AXES}")
        config = MeshConfig(**config)
    devices = list(jax.devices() if devices is None else devices)
    shape = config.resolve(len(devices))
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), MESH_AXES)


def _dividing_axes(target, dims: Sequence[int], mesh, used: set[str], allowed=None):
    """The mesh axes of a rule's ``target`` (an axis, a tuple of axes or None) that split every one of
    ``dims``, in order, skipping axes of size 1, axes in ``used`` (updated) and axes outside
    ``allowed`` (default: all). One axis as a str, several as a tuple, none as None."""
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    kept, size = [], 1
    for ax in axes:
        n = mesh.shape.get(ax, 1)
        if ax in used or n == 1 or (allowed is not None and ax not in allowed) or any(d % (size * n) for d in dims):
            continue
        kept.append(ax)
        size *= n
    used.update(kept)
    return None if not kept else kept[0] if len(kept) == 1 else tuple(kept)


def _mesh_axes_for(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules) -> P:
    """Logical names -> PartitionSpec, dropping mesh axes that do not divide the dimension or that an
    earlier dimension already uses (so e.g. 3 heads on tensor=2 stay replicated instead of failing)."""
    table = dict(rules)
    used: set[str] = set()
    return P(*(None if name is None else _dividing_axes(table.get(name), (dim,), mesh, used)
               for name, dim in zip(names, shape)))


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """NamedShardings for a tree of (possibly ``nn.LogicallyPartitioned``) abstract or real arrays.

    Leaves without logical names are replicated. The result mirrors the *unboxed* tree."""

    def one(leaf):
        if isinstance(leaf, nn.LogicallyPartitioned):
            return NamedSharding(mesh, _mesh_axes_for(leaf.names, leaf.value.shape, mesh, rules))
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map(one, abstract_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


_ACTIVE_RULES: contextvars.ContextVar[Rules | None] = contextvars.ContextVar("jaxformers_rules", default=None)


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """Context in which ``constrain`` on activations resolves against ``mesh`` and ``rules``.

    The rules are ours, not Flax's global ``logical_axis_rules``: parameter boxes then never apply
    constraints of their own (parameters get their shardings from ``init_sharded``)."""
    token = _ACTIVE_RULES.set(tuple(rules))
    try:
        with jax.set_mesh(mesh):
            yield
    finally:
        _ACTIVE_RULES.reset(token)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation by logical ``names`` (e.g. ``("act_batch", "act_len",
    "act_embed")``) under the mesh and rules of ``activate``; a no-op outside it. Mesh axes that do
    not divide a dimension are dropped instead of failing."""
    mesh = jax.sharding.get_abstract_mesh()
    rules = _ACTIVE_RULES.get()
    if mesh is None or mesh.empty or not rules:
        return x
    if len(names) != x.ndim:
        raise ValueError(f"constrain: {len(names)} axis names {tuple(names)} for an array of rank {x.ndim}")
    return jax.lax.with_sharding_constraint(x, _mesh_axes_for(names, x.shape, mesh, rules))


def init_sharded(
    model: nn.Module,
    rng: jax.Array,
    *inputs: Any,
    mesh: Mesh,
    rules: Rules = DEFAULT_RULES,
    **init_kwargs: Any,
) -> Any:
    """``model.init`` with every variable created directly in its sharding (never whole on one device).

    Returns unboxed variables (plain arrays, each a ``jax.Array`` with a NamedSharding)."""
    init_kwargs.setdefault("train", False)
    rngs = {"params": rng, "dropout": jax.random.fold_in(rng, 1)} if not isinstance(rng, dict) else rng

    def init_fn(rngs, *inputs):
        return model.init(rngs, *inputs, **init_kwargs)

    # No mesh is active while tracing init: the shardings come only from out_shardings, so parameter
    # boxes never impose (possibly non-dividing) constraints of their own.
    abstract = jax.eval_shape(init_fn, rngs, *inputs)
    shardings = logical_shardings(abstract, mesh, rules)
    return jax.jit(lambda r, *x: nn.unbox(init_fn(r, *x)), out_shardings=shardings)(rngs, *inputs)


# Where shard_kernel splits a kernel call's axes: fixed, not the active rules, because a jitted
# caller's cache keys on the mesh only (a rules switch under the same mesh would reuse a stale split).
KERNEL_AXES = {"batch": BATCH_AXES, "heads": "tensor"}


def shard_kernel(fn, in_names: Sequence[Sequence[str | None]], out_names: Sequence[str | None],
                 units: Mapping[str, int] | None = None):
    """``fn`` run per device under the active mesh, inside ``shard_map``: for Pallas kernel calls, and ops
    XLA's partitioner gets wrong (``jaxformers.layers.linear.grouped_conv_general_dilated``).

    XLA cannot partition a Pallas call: on a GPU it gathers every operand onto each device and repeats
    the whole call there; on a TPU it refuses to compile it ("Mosaic kernels cannot be automatically
    partitioned"). Under a mesh of several devices ``fn`` therefore runs in ``shard_map``: axes named
    ``"batch"`` split over data x fsdp and axes named ``"heads"`` over tensor (:data:`KERNEL_AXES`,
    where the activations of :data:`DEFAULT_RULES` already are); ``in_names`` holds one tuple of
    names (or None) per argument, ``out_names`` one for the output. A mesh axis is used for a name
    only where it divides every dimension carrying that name (others stay replicated: every device
    then runs them whole), so ``fn`` sees consistent slices and must compute each index of a named
    axis independently (examples; heads, with the key/value heads they are grouped on). ``units``
    gives the count of independent units along a name where a dimension folds several together
    (e.g. ``{"heads": 8}`` for channels of 8 heads): the axis must then divide that count. Without an
    active mesh, on a mesh of one device, or where an enclosing ``shard_map`` already made every axis
    manual, ``fn`` runs as is. Gradients flow as usual (replicated operands get the sum of every
    device's share)."""

    def run(*args):
        mesh = jax.sharding.get_abstract_mesh()
        if mesh is None or mesh.empty:
            return fn(*args)
        auto = frozenset(a for a, t in zip(mesh.axis_names, mesh.axis_types) if t != jax.sharding.AxisType.Manual)
        if not auto or (mesh.size == 1 and len(auto) == len(mesh.axis_names)):
            return fn(*args)
        sizes: dict[str, list[int]] = {}
        for names, x in zip(in_names, args, strict=True):
            for name, dim in zip(names, x.shape):
                if name is not None:
                    sizes.setdefault(name, []).append(dim)
        sizes.update({name: [n] for name, n in (units or {}).items() if name in sizes})
        used: set[str] = set()
        chosen = {name: _dividing_axes(KERNEL_AXES[name], dims, mesh, used, allowed=auto)
                  for name, dims in sizes.items()}
        spec = lambda names: P(*(chosen.get(name) if name else None for name in names))  # noqa: E731
        in_specs = tuple(spec(names) for names in in_names)
        if any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):  # explicit sharding: args must match
            args = [jax.sharding.reshard(x, s) for x, s in zip(args, in_specs)]
        return jax.shard_map(fn, in_specs=in_specs, out_specs=spec(out_names), axis_names=auto,
                             check_vma=False)(*args)

    return run


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Sharding that splits the leading (batch) axis over data x fsdp."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Places every array of ``batch`` with its leading axis split over data x fsdp.

    The batch size must be divisible by data*fsdp; a clear error says so otherwise."""
    n = mesh.shape["data"] * mesh.shape["fsdp"]

    def put(x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        if x.ndim == 0 or x.shape[0] % n:
            raise ValueError(f"batch axis of size {x.shape[0] if x.ndim else 'scalar'} is not divisible "
                             f"by data*fsdp = {n} devices")
        return jax.device_put(x, batch_sharding(mesh, x.ndim))

    return jax.tree_util.tree_map(put, batch)


def unsharded_params(variables: Any, mesh: Mesh, min_size: int = 2**16) -> list[str]:
    """Names of parameters with at least ``min_size`` elements that are fully replicated although
    the mesh has fsdp > 1. Empty means every large parameter is really split."""
    if mesh.shape["fsdp"] == 1:
        return []
    bad = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        if leaf.size >= min_size and leaf.sharding.is_fully_replicated:
            bad.append(jax.tree_util.keystr(path))
    return bad


def check_sharded(variables: Any, mesh: Mesh, min_size: int = 2**16) -> None:
    """Raises if a large parameter stayed replicated on a mesh with fsdp > 1."""
    bad = unsharded_params(variables, mesh, min_size)
    if bad:
        raise ValueError(f"{len(bad)} parameter(s) with >= {min_size} elements are replicated on an fsdp "
                         f"mesh: {bad[:10]}")
