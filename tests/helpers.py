"""Helpers shared by the test files: inputs, parameter perturbation, fast-compiling jit, NumPy-drawn
variables, the digits data set, the train / sharded-vs-single-device drivers, timm-parity plumbing and
a pretend GPU for the kernel choice.

Import as ``from tests.helpers import ...``: pytest (``--import-mode=importlib``, rootdir = the repo)
imports every test module as ``tests.<path>``, with ``tests`` a namespace package rooted at this
folder, so the import works from any working directory without ``__init__.py`` files or sys.path edits.
Not collected (the name does not start with ``test_``).
"""
from __future__ import annotations

import os
import pathlib
import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxformers as jf
from jaxformers.sharding import activate, logical_shardings, shard_batch


def subjaxprs(jaxpr):
    """The jaxprs nested in ``jaxpr``'s equations (custom VJPs, jits, loop bodies, kernels), recursively."""
    for eqn in jaxpr.eqns:
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield inner
                    yield from subjaxprs(inner)


def shard_map_specs(fn, *args) -> list[tuple[tuple, Any]]:
    """(in_specs, out_spec) of every shard_map in ``fn``'s jaxpr on ``args``, nested ones included."""
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    return [(tuple(e.params["in_specs"]), e.params["out_specs"][0]) for j in [jaxpr, *subjaxprs(jaxpr)]
            for e in j.eqns if e.primitive.name == "shard_map"]


_before_jax_0_11 = pytest.mark.skipif(
    tuple(int(p) for p in jax.__version__.split(".")[:2]) < (0, 11),
    reason="Mosaic GPU interpret mode cannot run vector loads from shared memory before jax 0.11")


def needs_mosaic_gpu_interpreter(test: Callable) -> Callable:
    """For tests that run the Hopper (Mosaic GPU) kernels in interpret mode on the CPU: skipped before
    jax 0.11 (it cannot run vector loads from shared memory), and marked ``mosaic_gpu_interpret`` so
    the CI leg at the GPU machines' jax runs them and the newest-jax leg leaves them to it."""
    return pytest.mark.mosaic_gpu_interpret(_before_jax_0_11(test))

# The test models are tiny: compile them at XLA's lowest optimisation level (halves compile time).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def xla_flags(devices: int | None) -> str:
    """The test run's ``XLA_FLAGS`` (``tests/conftest.py``: fastest compilation) for a child process with
    ``devices`` simulated CPU devices (``None``: the platform's own, one on a CPU runtime)."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", "")).split()
    return " ".join(flags + ([f"--xla_force_host_platform_device_count={devices}"] if devices else []))


def fast_jit(fn: Callable, **kwargs) -> Callable:
    """``jax.jit`` with ``FAST_COMPILE`` options (same numbers, less compile time for tiny models)."""
    return jax.jit(fn, compiler_options=FAST_COMPILE, **kwargs)


def image(batch: int, size: int, seed: int = 0) -> jax.Array:
    """A standard-normal NHWC float32 batch of ``size`` x ``size`` RGB images."""
    return jax.random.normal(jax.random.key(seed), (batch, size, size, 3), jnp.float32)


def perturb(params: Any, seed: int = 1, scale: float = 0.05) -> Any:
    """``params`` plus N(0, scale) noise on every leaf, drawn on the host with NumPy (no per-leaf random
    programs to compile): zero-initialised heads, biases and LayerNorm offsets would make any two
    models agree. Returns jax arrays in the leaves' dtypes."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda x: jnp.asarray(np.asarray(x) + scale * rng.standard_normal(np.shape(x)), jnp.asarray(x).dtype), params)


def init_variables(model: nn.Module, size: int, batch: int = 2, perturbed: bool = False) -> dict:
    """``model.init`` on ``image(batch, size)`` with key 0 as one fast-compiled program, unboxed;
    with ``perturbed`` the params then go through ``perturb``."""
    variables = fast_jit(lambda rng, x: nn.unbox(model.init({"params": rng}, x)))(jax.random.key(0), image(batch, size))
    return {**variables, "params": perturb(variables["params"])} if perturbed else variables


def numpy_variables(model: nn.Module, *inputs, seed: int = 0) -> dict:
    """Variables in the model's shapes drawn with NumPy (kernels N(0, 1/fan_in), non-trivial
    norms, biases and BN statistics): no compiled ``init`` (its random initialisers cost far more
    XLA compile time on CPU than the forward pass)."""
    abstract = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs)))
    rng = np.random.default_rng(seed)

    def sample(path, leaf):
        name, n = path[-1].key, rng.standard_normal(leaf.shape)
        value = {"scale": 1.0 + 0.1 * n, "var": 1.0 + 0.1 * np.abs(n), "bias": 0.05 * n, "mean": 0.05 * n}.get(name)
        if value is None:  # a kernel: (..., fan_in dims, out)
            value = n / np.sqrt(np.prod(leaf.shape[:-1]))
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(sample, abstract)


def model_and_features(name: str, x: jax.Array, **overrides) -> tuple[nn.Module, dict, Any]:
    """``create_model(name, **overrides)``, its ``numpy_variables`` for ``x`` and its (jitted, eval-mode)
    outputs on ``x`` in one pass (``output="all"``: a ``BackboneOutput`` of the stride-keyed
    ``features``, ``pre_logits`` and ``logits``): what a module-scoped fixture shares between a file's tests."""
    model = jf.create_model(name, **overrides)
    variables = numpy_variables(model, x)
    outputs = fast_jit(lambda v, x: model.apply(v, x, output="all"))(variables, x)
    return model, variables, outputs


def random_params(module: nn.Module, *inputs, seed: int = 4) -> dict:
    """N(0, 0.3) values in the module's parameter shapes (norms, biases, LePE and position weights
    all non-trivial, unlike the default init), without compiling its init."""
    shapes = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), *inputs))["params"]
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(0.0, 0.3, s.shape), jnp.float32), shapes)


def digits(n: int = 32, size: int = 32) -> tuple[jax.Array, jax.Array]:
    """The first ``n`` scikit-learn digits as (n, size, size, 3) images in [-0.5, 0.5] and their labels:
    a real (learnable) task for the few-step training tests."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.images[:n].astype(np.float32) / 16.0
    x = np.kron(x, np.ones((size // 8, size // 8), np.float32))
    return jnp.asarray(np.repeat(x[..., None], 3, axis=-1) - 0.5), jnp.asarray(d.target[:n])


def segmentation_shapes(n: int = 8, size: int = 64, split: str = "train") -> tuple[jax.Array, jax.Array]:
    """The first ``n`` generated scenes of ``train.seg_data.PanopticShapes`` as (n, size, size, 3) images
    in [-0.5, 0.5] and (n, size, size) int32 semantic labels (6 classes, 255 = void): the offline
    per-pixel task of the segmentation training tests."""
    from train.seg_data import PanopticShapes

    data = PanopticShapes(split, size=size).arrays(n)
    return jnp.asarray(data["image"], jnp.float32) / 255.0 - 0.5, jnp.asarray(data["semantic"])


def panoptic_batch(n: int = 8, split: str = "train") -> dict[str, np.ndarray]:
    """The first ``n`` generated scenes of ``train.seg_data.PanopticShapes`` as a batch of the panoptic
    task (``train.tasks_seg.PanopticSegmentationTask``): images in [-1, 1] and every target field."""
    from train.seg_data import PanopticShapes

    data = PanopticShapes(split).arrays(n)
    return {"image": (data["image"] / 127.5 - 1.0).astype(np.float32),
            **{k: data[k] for k in ("semantic", "panoptic", "segment_classes", "segment_crowd")}}


def panoptic_scores(model: nn.Module, task: Any, batch: dict[str, np.ndarray]) -> Callable[[dict], dict[str, float]]:
    """``scores(variables) -> {"PQ": ..., "mIoU": ..., ...}`` of ``model`` on ``batch`` through the trainer's
    eval step (one fast-compiled program) and the task's ``finish_eval``, as the training CLI evaluates."""
    from train import steps

    eval_step = fast_jit(steps.make_eval_step(model, task))
    batch = {**batch, "mask": np.ones(len(batch["image"]), np.float32)}

    def scores(variables: dict) -> dict[str, float]:
        sums = jax.device_get(eval_step(variables["params"], variables.get("batch_stats"), batch))
        count = sums.pop("count")
        return task.finish_eval({k: float(v) / count for k, v in sums.items()})

    return scores


def assert_every_param_has_gradient(grads: Any) -> None:
    """Fails naming every parameter whose gradient is all zeros (a branch cut off from the loss)."""
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    dead = [jax.tree_util.keystr(p) for p, g in flat if not np.any(np.asarray(g))]
    assert not dead, f"parameters without gradient: {dead}"


def train_classifier(model: nn.Module, variables: dict, x: jax.Array, y: jax.Array, *, steps: int,
                     tx: Any = None, loss: Callable[[Any, jax.Array], jax.Array] | None = None,
                     ) -> tuple[list[float], dict]:
    """``steps`` optimizer steps (default Adam, lr 3e-3) of ``loss(outputs, y)`` (default softmax
    cross-entropy of the logits; e.g. ``jaxformers.segmentation.semantic_cross_entropy`` for per-pixel
    labels) on ``(x, y)`` in training mode, one fast-compiled step: dropout / drop-path key ``i`` at
    step ``i``, BatchNorm statistics (``batch_stats``, when the model has them) updated as it trains.
    Fails, naming them, when a parameter gets no gradient at the first step (parameters a model keeps
    frozen with ``jax.lax.stop_gradient`` must then be left out of ``variables["params"]``).
    Returns the losses and the final variables."""
    tx = optax.adam(3e-3) if tx is None else tx
    objective = loss or (lambda logits, labels: optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean())
    params, rest = variables["params"], {k: v for k, v in variables.items() if k != "params"}
    mutable = [k for k in rest if k == "batch_stats"]

    @fast_jit
    def step(params, rest, opt_state, rng):
        def loss_fn(p):
            out = model.apply({"params": p, **rest}, x, train=True, rngs={"dropout": rng}, mutable=mutable or False)
            outputs, updates = out if mutable else (out, {})
            return objective(outputs, y), updates

        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        new, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, new), {**rest, **updates}, opt_state, loss, grads

    opt_state, losses = tx.init(params), []
    for i in range(steps):
        params, rest, opt_state, loss, grads = step(params, rest, opt_state, jax.random.key(i))
        losses.append(float(loss))
        if i == 0:
            assert_every_param_has_gradient(grads)
    assert np.all(np.isfinite(losses)), losses
    return losses, {"params": params, **rest}


def train_with_remat_check(model: nn.Module, remat: nn.Module, params: Any, x: jax.Array, y: jax.Array,
                           steps: int = 8, check_step: int = 1) -> tuple[list[float], Any]:
    """``steps`` AdamW steps (lr 1e-2, weight decay 0.05) of softmax cross-entropy on ``(x, y)`` in
    training mode (dropout key ``i`` at step ``i``). At ``check_step`` the rematerialised ``remat``
    must give ``model``'s gradients (same parameters, same dropout draws), all finite.
    Returns the losses and the gradients of ``check_step``."""
    tx = optax.adamw(1e-2, weight_decay=0.05)
    opt_state = tx.init(params)

    def loss_fn(p, m, rng):
        logits = m.apply({"params": p}, x, train=True, rngs={"dropout": rng})
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @fast_jit
    def step(params, opt_state, rng):
        loss, grads = jax.value_and_grad(loss_fn)(params, model, rng)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, grads

    losses, checked = [], None
    for i in range(steps):
        new_params, opt_state, loss, grads = step(params, opt_state, jax.random.key(i))
        if i == check_step:
            remat_grads = fast_jit(jax.grad(loss_fn), static_argnums=1)(params, remat, jax.random.key(i))
            for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(remat_grads)):
                assert np.isfinite(a).all()
                np.testing.assert_allclose(a, b, atol=1e-5)
            checked = grads
        params = new_params
        losses.append(float(loss))
    return losses, checked


def shard_like_init(model: nn.Module, variables: Any, x: jax.Array, mesh: jax.sharding.Mesh) -> Any:
    """``variables`` placed on ``mesh`` as ``init_sharded`` would place them (from the parameters'
    logical axes), without compiling an init."""
    return jax.device_put(variables, logical_shardings(jax.eval_shape(model.init, jax.random.key(0), x), mesh))


def single_and_sharded(fn: Callable, variables: Any, sharded_variables: Any, x: jax.Array,
                       mesh: jax.sharding.Mesh) -> tuple[Any, Any]:
    """``fn(variables, x)`` on one device, and ``fn(sharded_variables, x sharded over the batch)``
    under the active ``mesh``: the pair a sharded-equals-single-device test compares."""
    single = fn(variables, x)
    with activate(mesh):
        sharded = fn(sharded_variables, shard_batch(x, mesh))
    return single, sharded


def assert_sharded_forward_matches(model: nn.Module, variables: Any, x: jax.Array, *, tol: float = 1e-5) -> None:
    """``model.apply`` on one device equals the same call on a data x fsdp x tensor = 2 x 2 x 2 mesh
    (parameters placed as ``init`` would shard them, ``x`` split over the batch), every output leaf
    non-trivial (std > 1e-3) and within ``tol`` (relative and absolute)."""
    from jaxformers.sharding import make_mesh

    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    single, sharded = single_and_sharded(fast_jit(model.apply), variables,
                                         shard_like_init(model, variables, x, mesh), x, mesh)
    for a, b in zip(jax.tree_util.tree_leaves(single), jax.tree_util.tree_leaves(sharded)):
        assert float(jnp.std(a)) > 1e-3
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=tol, atol=tol)


def assert_sharded_grads_match(model: nn.Module, variables: Any, sharded_variables: Any, x: jax.Array,
                                mesh: jax.sharding.Mesh, tol: float = 1e-4) -> None:
    """The parameter gradients of a fixed random projection of ``model``'s output agree on one device and
    sharded over ``mesh`` (each leaf within ``tol`` of its largest entry)."""
    out = jax.eval_shape(model.apply, variables, x)
    projection = jax.random.normal(jax.random.key(0), out.shape, out.dtype)

    def grads(v, x):
        rest = {k: c for k, c in v.items() if k != "params"}
        return jax.grad(lambda p: jnp.sum(model.apply({"params": p, **rest}, x) * projection))(v["params"])

    single, sharded = single_and_sharded(fast_jit(grads), variables, sharded_variables, x, mesh)
    leaves = jax.tree_util.tree_leaves_with_path(single)
    for (path, a), b in zip(leaves, jax.tree_util.tree_leaves(sharded), strict=True):
        scale = max(float(jnp.max(jnp.abs(a))), 1e-6)
        np.testing.assert_allclose(np.asarray(b) / scale, np.asarray(a) / scale, atol=tol,
                                   err_msg=jax.tree_util.keystr(path))


def perturbed_torch_model(make: Callable[[], Any], seed: int = 0, scale: float = 0.05) -> Any:
    """``make()`` built after ``torch.manual_seed(seed)``, in eval mode, with N(0, scale) noise added to
    every parameter: timm zero-initialises heads and LayerNorm offsets, which would hide mix-ups."""
    import torch

    torch.manual_seed(seed)
    model = make().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


def torch_logits(model: Any, x: np.ndarray) -> np.ndarray:
    """A PyTorch image model's output for the NHWC batch ``x`` (passed as NCHW), without autograd."""
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())).numpy()


def assert_logits_match_torch(name: str, ref_model: Any, path, img_size: int, **overrides) -> None:
    """Model ``name`` at ``img_size``, loaded through its converter from ``path`` (``ref_model``'s saved
    state dict), gives ``ref_model``'s logits to 1e-4 on two random images; the logits are large
    enough (> 0.1) for that to mean something."""
    variables = jf.load_pretrained(name, path, img_size=img_size, **overrides)
    model = jf.create_model(name, img_size=img_size, **overrides)
    x = np.random.RandomState(1).randn(2, img_size, img_size, 3).astype(np.float32)
    ref = torch_logits(ref_model, x)
    out = np.asarray(fast_jit(model.apply)(variables, x))
    assert np.abs(ref).max() > 0.1
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


def assert_timm_backbone_parity(name: str, cfg: dict, official_layout: Callable[[dict], dict], tmp_path,
                                 size: int = 64) -> None:
    """timm model ``name`` (``cfg``, perturbed weights) against ours loaded through ``load_pretrained``:
    the logits and the four feature maps (strides 4-32, timm's ``forward_intermediates``) match, and the
    official repository's checkpoint layout (``official_layout(timm state dict)``) loads to the same
    variables."""
    import torch
    import timm

    import jaxformers as jf

    ref = perturbed_torch_model(lambda: timm.create_model(name, **cfg))
    torch.save(ref.state_dict(), tmp_path / "timm.pth")
    torch.save(official_layout(ref.state_dict()), tmp_path / "official.pth")
    variables = jf.load_pretrained(name, tmp_path / "timm.pth", **cfg)
    official = jf.load_pretrained(name, tmp_path / "official.pth", **cfg)
    jax.tree_util.tree_map(np.testing.assert_array_equal, variables, official)
    model = jf.create_model(name, **cfg)
    x = np.random.RandomState(1).randn(2, size, size, 3).astype(np.float32)
    logits, feats = fast_jit(lambda v, x: (model.apply(v, x), model.apply(v, x, method="forward_features")))(
        variables, x)
    with torch.no_grad():
        ref_feats = ref.forward_intermediates(torch.from_numpy(x.transpose(0, 3, 1, 2)), intermediates_only=True)
    ref_logits = torch_logits(ref, x)
    assert np.abs(ref_logits).max() > 0.1
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=0)
    assert sorted(feats) == [4, 8, 16, 32]
    for i, f in enumerate(ref_feats):
        np.testing.assert_allclose(feats[4 * 2 ** i], f.numpy().transpose(0, 2, 3, 1), atol=1e-4, rtol=0)


def packed_segments(batch: int, length: int) -> jax.Array:
    """(batch, length) int32 segment ids: rows of packed sequences of uneven lengths, a one-token
    segment, and a padded tail of 17 zeros (the kernels' packed variable-length tests)."""
    rng = np.random.default_rng(0)
    seg = np.zeros((batch, length), np.int32)
    for row in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, length - 20), 3, replace=False))
        bounds = [0, *cuts, cuts[-1] + 1, length - 17]
        for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            seg[row, a:b] = s + 1
    return jnp.asarray(seg)


def lowered_functions(text: str, name: str) -> dict[str, int]:
    """The private functions named ``name`` (or ``name_N``) in a lowered module's StableHLO text, and
    how many calls each has (one function called from every call site = one shared lowering)."""
    names = re.findall(rf"func\.func private @({name}(?:_\d+)?)\(", text)
    return {n: text.count(f"call @{n}(") for n in names}


class _FakeGpu:
    def __init__(self, capability: str | None, kind: str):
        if capability is not None:
            self.compute_capability = capability
        self.device_kind = kind


def on_fake_gpu(monkeypatch, capability: str | None, kind: str = "NVIDIA GPU") -> None:
    """Makes JAX's default backend a GPU of this compute capability ("8.9"; None: one that does not
    give it, as a ROCm GPU), for code that picks kernels by ``jax.default_backend()`` and
    ``jax.devices("gpu")``; nothing runs on it."""
    devices = jax.devices
    fake = _FakeGpu(capability, kind)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "devices", lambda backend=None: [fake] if backend in ("gpu", "cuda") else devices(backend))


def zen_of_python_chars(rows: int, length: int, vocab_size: int = 100) -> tuple[np.ndarray, int]:
    """Real offline text for tiny language models: the Zen of Python (``this``, decoded without
    printing) as character ids (code point - 30, clipped to [1, vocab_size - 1]), cut into ``rows``
    windows of ``length`` tokens at evenly spaced offsets. Returns (ids (rows, length) int32, the
    number of distinct ids in the text)."""
    import codecs
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        import this
    text = codecs.decode(this.s, "rot13")
    ids = np.clip(np.frombuffer(text.encode("ascii", "replace"), np.uint8).astype(np.int32) - 30, 1, vocab_size - 1)
    starts = np.linspace(0, len(ids) - length - 1, rows).astype(int)
    return np.stack([ids[s:s + length] for s in starts]).astype(np.int32), len(np.unique(ids))


def digit_sequences(n: int = 32, seed: int | None = None) -> tuple[jax.Array, jax.Array]:
    """The first ``n`` scikit-learn digits read as sequences: (n, 64) int32 pixel intensities 0..16 in
    row-major order (a fixed random permutation of the 64 steps when ``seed`` is given: a small
    psMNIST), and their labels. Real data for sequence models (language models, LMU, SSMs)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.images[:n].reshape(n, 64).astype(np.int32)
    if seed is not None:
        x = x[:, np.random.default_rng(seed).permutation(64)]
    return jnp.asarray(x), jnp.asarray(d.target[:n])


def import_pytorch_wavelets() -> Any:
    """``pytorch_wavelets`` (skips the test when it is not installed). Version 1.3.0 reads its filter
    taps through ``pkg_resources.resource_stream``, which setuptools >= 81 no longer ships: a stand-in
    ``pkg_resources`` with just that function (``importlib.resources``) is installed while it imports,
    then taken out of ``sys.modules`` again (the module keeps its own reference): a lasting partial
    ``pkg_resources`` breaks whatever later probes for the real one (pytest's ``syspath_prepend``)."""
    import importlib
    import importlib.resources
    import sys
    import types

    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        shim = types.ModuleType("pkg_resources")
        shim.resource_stream = lambda package, name: importlib.resources.files(package).joinpath(name).open("rb")
        sys.modules["pkg_resources"] = shim
        try:
            wavelets = pytest.importorskip("pytorch_wavelets")
            importlib.import_module("pytorch_wavelets.dtcwt.coeffs")
        finally:
            if sys.modules.get("pkg_resources") is shim:
                del sys.modules["pkg_resources"]
        return wavelets
    return pytest.importorskip("pytorch_wavelets")


# Official PyTorch code fetched for live parity checks (never committed): $JAXFORMERS_EXT/<owner+repo>.
OFFICIAL_CODE = pathlib.Path(os.environ.get("JAXFORMERS_EXT", "/work/ext"))


def load_official(repo: str, relpath: str, name: str | None = None, *, path_entry: str | None = None,
                  stubs: dict[str, Any] | None = None) -> Any:
    """The module at ``$JAXFORMERS_EXT/<repo>/<relpath>`` (default /work/ext: official code fetched for
    live parity checks, never committed); the test skips where it is absent (CI). With ``name`` the file is
    imported as a module of that name; without, as the package module its path names (``nets/x.py`` ->
    ``nets.x``, relative imports work) with the repository root on ``sys.path``. ``path_entry`` (relative
    to the repository) goes on ``sys.path`` for the file's own imports; ``stubs`` maps module names to
    stand-in modules (e.g. a registry import) set in ``sys.modules`` unless already imported."""
    import importlib
    import importlib.util
    import sys

    file = OFFICIAL_CODE / repo / relpath
    if not file.exists():
        pytest.skip(f"the official {repo} code is not fetched to {OFFICIAL_CODE}")
    for module_name, stub in (stubs or {}).items():
        sys.modules.setdefault(module_name, stub)
    entry = path_entry if path_entry is not None else ("" if name is None else None)
    if entry is not None and str(OFFICIAL_CODE / repo / entry) not in sys.path:
        sys.path.insert(0, str(OFFICIAL_CODE / repo / entry))
    if name is None:
        return importlib.import_module(relpath[:-3].replace("/", "."))
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def prompted_shapes(n: int = 8, size: int = 64, split: str = "train") -> tuple[jax.Array, jax.Array, jax.Array]:
    """Box-prompted binary segmentation from the generated scenes (``train.seg_data.PanopticShapes``): per
    image the largest thing (disc, box or triangle) as a (n, size, size) float32 0/1 mask and its
    bounding box (n, 4) as (x0, y0, x1, y1) pixels (x1, y1 exclusive), with the (n, size, size, 3)
    images in [-0.5, 0.5]: the offline task of prompted segmenters (SAM-style)."""
    from train.seg_data import THING_IDS, PanopticShapes

    data = PanopticShapes(split, size=size).arrays(n)
    masks, boxes = np.zeros((n, size, size), np.float32), np.zeros((n, 4), np.float32)
    for i in range(n):
        pan, classes = data["panoptic"][i], data["segment_classes"][i]
        areas = [(np.sum(pan == s + 1), s + 1) for s in range(len(classes)) if classes[s] in THING_IDS]
        seg = max(areas)[1] if areas else int(np.bincount(pan.ravel()).argmax())
        masks[i] = pan == seg
        ys, xs = np.nonzero(masks[i])
        boxes[i] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    return jnp.asarray(data["image"], jnp.float32) / 255.0 - 0.5, jnp.asarray(masks), jnp.asarray(boxes)
