"""benchmarks/compile_check.py: its report parsing, and its message on a host without the CUDA plugin
or libtpu (the compile itself needs jax[cuda13] or jax[tpu]; `make compile-h100` / `compile-tpu`)."""
import importlib.util
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]

PTXAS = """ptxas info    : Compiling entry function 'mosaic_bra_dkv_kernel' for 'sm_90a'
ptxas info    : Function properties for mosaic_bra_dkv_kernel
    16 bytes stack frame, 812 bytes spill stores, 712 bytes spill loads
ptxas info    : Used 168 registers, used 16 barriers, 16 bytes cumulative stack size, 1 bytes smem
"""

# jax 0.12 compiles Mosaic GPU kernels separably (ptxas -c, then nvlink): ptxas drops setmaxnreg
LOSSES = """ptxas info    : (C7504) Potential Performance Loss: 'setmaxnreg' ignored to maintain compatibility across compilation units.
ptxas info    : (C7512) Potential Performance Loss: wgmma.mma_async instructions are serialized due to insufficient register resources for the function 'k'
"""


def load():
    spec = importlib.util.spec_from_file_location("compile_check", ROOT / "benchmarks" / "compile_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ptxas_report_groups_identical_kernels_and_reads_spills(tmp_path):
    mod = load()
    mod.DUMP["dir"] = str(tmp_path)
    for i in (0, 3):
        (tmp_path / f"mosaic_bra_dkv_{i}.ptxas").write_text(PTXAS)
        (tmp_path / f"mosaic_bra_dkv_{i}.resources.txt").write_text("Resources(smem_scratch_bytes=135168, x=1)")
    (tmp_path / "mosaic_local_global_fwd_1.ptxas").write_text(
        PTXAS.replace("812 bytes spill stores, 712", "0 bytes spill stores, 0").replace("Used 168", "Used 232"))
    (tmp_path / "mosaic_local_global_dkv_2.ptxas").write_text(LOSSES + PTXAS)
    lines = mod.ptxas_report()
    assert len(lines) == 3
    dkv = lines.pop(1)  # sorted by name
    assert "mosaic_local_global_dkv" in dkv and dkv.endswith(
        "ptxas: 'setmaxnreg' ignored (C7504), wgmma.mma_async instructions are serialized (C7512)")
    assert "ptxas:" not in lines[0] + lines[1]
    assert "mosaic_bra_dkv" in lines[0] and "x2" in lines[0] and "168 registers" in lines[0]
    assert "812/712 B" in lines[0] and "132 KiB" in lines[0]
    assert "mosaic_local_global_fwd" in lines[1] and "232 registers" in lines[1] and " 0/0 B" in lines[1]
    assert "?" in lines[1]  # no resources dump: unknown shared memory, not a made-up number
    assert not any(tmp_path.iterdir())  # consumed: the next row starts from an empty dump


def test_triton_report_reads_our_kernels_from_the_compiler_log(tmp_path):
    mod = load()
    log = tmp_path / "compile.log"
    fusion = PTXAS.replace("mosaic_bra_dkv_kernel", "loop_pad_fusion").replace("812", "4")
    log.write_text("I1127 old line\n" + PTXAS.replace("mosaic_bra_dkv_kernel", "bra_dq").replace("812", "8"))
    mod.DUMP.update(log=str(log), log_offset=log.stat().st_size)  # written before this row: not reported

    class Compiled:
        def as_text(self):
            return ('custom_call(a), custom_call_target="__gpu$xla.gpu.triton", operand_layout_constraints={}, '
                    'backend_config={grid_x = 16 : i32, ir = "ML\\EFR", name = "bra_dkv", num_warps = 4 : i32}')

    with open(log, "a") as f:
        f.write(fusion + "I1127 ptxas info    : 0 bytes gmem\n" + PTXAS.replace("mosaic_bra_dkv_kernel", "bra_dkv")
                + PTXAS.replace("mosaic_bra_dkv_kernel", "bra_dkv__1").replace("168", "96"))
    lines = mod.triton_report(Compiled())
    assert len(lines) == 2  # XLA's own fusion kernels are left out
    assert "bra_dkv " in lines[0] and "168 registers" in lines[0] and "812/712 B" in lines[0]
    assert "bra_dkv__1" in lines[1] and "96 registers" in lines[1]  # another shape of the same call
    assert mod.triton_report(Compiled()) == []  # read once: the next row starts after it
    assert mod.ptxas_entries("no ptxas here") == []


def test_gpu_target_configs_describe_each_gpu():
    mod = load()
    assert {"h100", "a100", "b200", "l4", "rtx_pro_6000", "t4"} <= set(mod.TARGETS)
    for target, spec in mod.GPU_SPECS.items():
        config = mod.gpu_target_config(target)
        assert config.count("{") == config.count("}") == 4  # device info, compute capability, dnn, runtime
        major, minor = spec.capability
        assert f"core_count: {spec.sms}\n" in config and f"major: {major} minor: {minor}" in config
        assert f'device_description_str: "{spec.name}"' in config
        # Pallas' GpuVersion is looked up by this name (and the target's upper case)
        assert re.search(rf"\b{target.upper().replace('_', ' ')}\b", spec.name)


def test_kernels_in_names_each_kind():
    class Compiled:
        def as_text(self):
            return ('custom_call_target="__gpu$xla.gpu.triton" custom_call_target="mosaic_gpu_v2" '
                    'custom_call_target="mosaic_gpu_v2" custom_call_target="__cudnn$convForward" '
                    'custom_call_target="__cublas$gemm" custom_call_target="tpu_custom_call"')

    assert load().kernels_in(Compiled()) == "1 cudnn, 2 mosaic, 1 pallas tpu, 1 triton"


def test_without_the_cuda_plugin_it_says_what_to_install(monkeypatch):
    if importlib.util.find_spec("jax_plugins") and any(
            importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") for v in (12, 13)):
        pytest.skip("the CUDA plugin is installed here")
    mod = load()
    monkeypatch.setattr(mod.os, "environ", dict(mod.os.environ))  # main() sets compile variables
    with pytest.raises(SystemExit, match="make compile-h100"):
        mod.main(["--target", "h100", "--only", "dense"])


def test_without_libtpu_it_says_what_to_install(monkeypatch):
    if importlib.util.find_spec("libtpu"):
        pytest.skip("libtpu is installed here")
    mod = load()
    monkeypatch.setattr(mod.os, "environ", dict(mod.os.environ))
    with pytest.raises(SystemExit, match="make compile-tpu"):
        mod.main(["--target", "v5e", "--only", "dense"])


def test_compile_row_tells_our_refusals_from_failures(capsys, tmp_path):
    import jax
    import jax.numpy as jnp

    from jaxformers.kernels import bi_level_routing_attention

    mod = load()
    mod.FAILED.clear()
    assert mod.ptxas_report() == []  # no dump directory yet: nothing read, nothing removed
    mod.DUMP["dir"] = str(tmp_path)
    x = jax.ShapeDtypeStruct((1, 6, 6, 8), jnp.float32)
    refuse = lambda: jax.jit(lambda q: bi_level_routing_attention(  # noqa: E731 - 6 is not divisible by 4
        q, q, q, num_heads=2, regions_per_side=4, topk=1)).trace(x).lower()
    assert mod.compile_row("refused row", refuse) is None and mod.FAILED == []
    assert "refused refused row" in capsys.readouterr().out

    def broken():
        raise ValueError("not ours")  # raised outside the jaxformers package: a failure

    assert mod.compile_row("broken row", broken) is None and mod.FAILED == ["broken row"]
    compiled = mod.compile_row("fine row", lambda: jax.jit(lambda q: q * 2).trace(x).lower())
    assert compiled is not None and mod.FAILED == ["broken row"]
    out = capsys.readouterr().out
    assert "FAIL broken row: ValueError: not ours" in out and "ok   fine row" in out
