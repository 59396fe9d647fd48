"""VMamba (vanilla, SS2D): an independent PyTorch re-derivation of the official v0 forward through the
converter, cross-scan algebra, features, training on digits, sharding, parameter counts."""
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxformers as jf
from jaxformers.models.vmamba import cross_merge, cross_scan
from jaxformers.sharding import make_mesh
from tests.helpers import (digits, fast_jit, numpy_variables, shard_like_init, single_and_sharded,
                           train_classifier)

TINY = dict(depth=(1, 1), dims=16, state_size=4, num_classes=10, drop_path_rate=0.0)


def _torch_vmamba(sd, x, depths, dims, n):
    """The official VSSM v0 forward (SS2D forwardv0, PatchMerging2D, classifier), written from the
    paper and the official file's tensor layouts, with a sequential selective scan."""
    import torch
    import torch.nn.functional as F

    def ln(t, p):
        return F.layer_norm(t, t.shape[-1:], sd[p + ".weight"], sd[p + ".bias"])

    def scan(u, delta, A, B, C, D):  # u, delta (b, d, l); A (d, n); B, C (b, n, l)
        delta = F.softplus(delta)
        h = torch.zeros(u.shape[0], u.shape[1], A.shape[1])
        ys = []
        for t in range(u.shape[2]):
            h = torch.exp(delta[:, :, t, None] * A) * h + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
            ys.append((h * C[:, None, :, t]).sum(-1))
        return torch.stack(ys, -1) + u * D[None, :, None]

    def ss2d(x, p):
        b, h, w, _ = x.shape
        xz = x @ sd[p + ".in_proj.weight"].T
        x, z = xz.chunk(2, -1)
        z = F.silu(z)
        x = F.silu(F.conv2d(x.permute(0, 3, 1, 2), sd[p + ".conv2d.weight"], sd[p + ".conv2d.bias"], padding=1,
                            groups=x.shape[-1]))
        d, L = x.shape[1], h * w
        hw = torch.stack([x.reshape(b, d, L), x.transpose(2, 3).reshape(b, d, L)], 1)
        xs = torch.cat([hw, hw.flip(-1)], 1)  # (b, 4, d, l)
        x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, sd[p + ".x_proj_weight"])
        r = sd[p + ".dt_projs_weight"].shape[-1]
        dts, Bs, Cs = torch.split(x_dbl, [r, n, n], 2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, sd[p + ".dt_projs_weight"])
        A = -torch.exp(sd[p + ".A_logs"]).view(4, d, n)
        ys = torch.stack([scan(xs[:, k], dts[:, k] + sd[p + ".dt_projs_bias"][k, :, None], A[k], Bs[:, k], Cs[:, k],
                               sd[p + ".Ds"].view(4, d)[k]) for k in range(4)], 1)
        inv = ys[:, 2:4].flip(-1)
        y = ys[:, 0] + inv[:, 0] + ys[:, 1].view(b, d, w, h).transpose(2, 3).reshape(b, d, L) + \
            inv[:, 1].view(b, d, w, h).transpose(2, 3).reshape(b, d, L)
        y = ln(y.transpose(1, 2), p + ".out_norm").view(b, h, w, d) * z
        return y @ sd[p + ".out_proj.weight"].T

    x = F.conv2d(x, sd["patch_embed.0.weight"], sd["patch_embed.0.bias"], stride=4).permute(0, 2, 3, 1)
    x = ln(x, "patch_embed.2")
    for i, depth in enumerate(depths):
        for j in range(depth):
            x = x + ss2d(ln(x, f"layers.{i}.blocks.{j}.norm"), f"layers.{i}.blocks.{j}.op")
        if i < len(depths) - 1:
            x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
            x = ln(x, f"layers.{i}.downsample.norm") @ sd[f"layers.{i}.downsample.reduction.weight"].T
    x = ln(x, "classifier.norm").mean((1, 2))
    return x @ sd["classifier.head.weight"].T + sd["classifier.head.bias"]


def test_matches_the_official_forward_through_the_converter(tmp_path):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    n, dims = 4, (16, 32)
    sd = {"patch_embed.0.weight": (16, 3, 4, 4), "patch_embed.0.bias": (16,), "patch_embed.2.weight": (16,),
          "patch_embed.2.bias": (16,), "classifier.norm.weight": (32,), "classifier.norm.bias": (32,),
          "classifier.head.weight": (10, 32), "classifier.head.bias": (10,),
          "layers.0.downsample.norm.weight": (64,), "layers.0.downsample.norm.bias": (64,),
          "layers.0.downsample.reduction.weight": (32, 64)}
    for i, d in enumerate(dims):
        p, e, r = f"layers.{i}.blocks.0.", 2 * d, -(-d // 16)
        sd.update({p + "norm.weight": (d,), p + "norm.bias": (d,), p + "op.in_proj.weight": (2 * e, d),
                   p + "op.conv2d.weight": (e, 1, 3, 3), p + "op.conv2d.bias": (e,),
                   p + "op.x_proj_weight": (4, r + 2 * n, e), p + "op.dt_projs_weight": (4, e, r),
                   p + "op.dt_projs_bias": (4, e), p + "op.A_logs": (4 * e, n), p + "op.Ds": (4 * e,),
                   p + "op.out_norm.weight": (e,), p + "op.out_norm.bias": (e,), p + "op.out_proj.weight": (d, e)})
    sd = {k: torch.tensor(rng.normal(0, 0.3, s) + (1.0 if k.endswith(("norm.weight", "Ds")) else 0.0),
                          dtype=torch.float32) for k, s in sd.items()}
    # the pre-release key names the official loader also reads
    sd["layers.1.blocks.0.ln_1.weight"] = sd.pop("layers.1.blocks.0.norm.weight")
    x = rng.normal(size=(2, 16, 16, 3)).astype(np.float32)
    expected = _torch_vmamba({k.replace(".ln_1.", ".norm."): v for k, v in sd.items()},
                             torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), (1, 1), dims, n).numpy()
    torch.save(sd, tmp_path / "vssm.pth")
    variables = jf.load_pretrained("vmamba_tiny", tmp_path / "vssm.pth", **TINY)
    out = fast_jit(jf.create_model("vmamba_tiny", **TINY).apply)(variables, x)
    assert np.abs(expected).max() > 0.1
    np.testing.assert_allclose(out, expected, atol=1e-4, rtol=0)


def test_cross_scan_merge_features_and_bad_input():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, 5, 4)), jnp.float32)
    xs = cross_scan(x)
    np.testing.assert_allclose(cross_merge(xs, 3, 5), 4 * x, atol=1e-6)  # every path visits every pixel once
    np.testing.assert_allclose(xs[:, 1, 1], x[:, 1, 0])  # column-major: (row 1, col 0) is second
    model = jf.create_model("vmamba_tiny", **TINY)
    img = digits(2)[0]
    variables = numpy_variables(model, img)
    feats = fast_jit(lambda v, x: model.apply(v, x, method="forward_features"))(variables, img)
    assert {k: v.shape for k, v in feats.items()} == {4: (2, 8, 8, 16), 8: (2, 4, 4, 32)}
    with pytest.raises(ValueError, match="divisible by 4x4"):
        model.apply(variables, img[:, :30, :30])


def test_trains_on_digits_and_shards():
    """One stage (patch merging is covered by the parity test), the sequential scan (the scans agree)."""
    model = jf.create_model("vmamba_tiny", **{**TINY, "depth": (1,), "drop_path_rate": 0.1}, scan="sequential")
    x, y = digits(32)
    losses, variables = train_classifier(model, numpy_variables(model, x[:1]), x, y, steps=10,
                                         tx=optax.adam(3e-2))
    assert losses[-1] < 0.8 * losses[0], losses

    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    single, sharded = single_and_sharded(fast_jit(model.apply), variables,
                                         shard_like_init(model, variables, x[:4], mesh), x[:4], mesh)
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), atol=1e-5)


def test_param_counts():
    """Vanilla-VMamba-T: the official VSSM's count; B at the paper's size (76M listed; S differs from B only
    in width)."""
    for name, n in {"vmamba_tiny": 22_893_448, "vmamba_base": 76_254_056}.items():
        assert jf.count_params(name, scan="sequential") == n, name
