r"""BERT throughput: packed (padding-free) vs padded batches, and vs transformers' PyTorch BERT (SDPA).

    python benchmarks/bert_throughput.py                 # BERT-base, batch 32 x 512, on the default device
    python benchmarks/bert_throughput.py --small         # a tiny BERT on CPU in well under a minute

The batch is a realistic length mix: lengths drawn uniformly from [1, L], so about half of the
padded layout's tokens are padding. The padded path runs (B, L) with an attention mask; the packed
path packs the same sequences into ~B/2 rows of L (``jaxformers.text.pack_sequences``) with
segment ids. Throughput counts real (non-padding) tokens per second, for the encoder forward and
for a masked-LM training step (AdamW), medians of timed repeats after a warm-up. When torch and
transformers are installed, their ``BertModel`` / ``BertForMaskedLM`` (attn_implementation="sdpa")
run the padded batch in the same process. The ByteTransformer target: packed >= 1.6x padded.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxformers.models.bert import Bert
from jaxformers.text import pack_sequences, pad_sequences

BASE = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
            max_position_embeddings=512)
SMALL = dict(vocab_size=1024, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512,
             max_position_embeddings=128)


def _time(fn, repeats: int) -> float:
    fn()  # warm-up / compile
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def make_batch(batch: int, length: int, vocab: int, seed: int = 0):
    rng = np.random.RandomState(seed)
    lengths = rng.randint(1, length + 1, batch)
    seqs = [list(rng.randint(5, vocab, n)) for n in lengths]
    return seqs, pad_sequences(seqs, length), pack_sequences(seqs, length)


def bench_jax(cfg: dict, seqs, padded, packed, repeats: int, dtype, attention_impl: str) -> dict[str, float]:
    real = sum(len(s) for s in seqs)
    encoder = Bert(**cfg, add_pooler=False, dtype=dtype, attention_impl=attention_impl)
    mlm = Bert(**cfg, head="mlm", dtype=dtype, attention_impl=attention_impl)
    params = nn.unbox(jax.jit(mlm.init)(jax.random.key(0), jnp.asarray(padded["input_ids"][:1])))["params"]
    enc_params = {k: v for k, v in params.items() if k != "mlm"}
    tx = optax.adamw(1e-4)
    opt_state = tx.init(params)

    def fwd(ids, mask, seg):
        return encoder.apply({"params": enc_params}, ids, mask, segment_ids=seg)["last_hidden_state"]

    def train_step(params, opt_state, ids, mask, seg, labels):
        def loss_fn(p):
            logits = mlm.apply({"params": p}, ids, mask, segment_ids=seg).astype(jnp.float32)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
            keep = (mask if mask is not None else (seg > 0)).astype(jnp.float32)
            return (ce * keep).sum() / keep.sum()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    fwd_jit = jax.jit(fwd)
    step_jit = jax.jit(train_step, donate_argnums=(0, 1))
    out = {}
    layouts = {"padded": (padded["input_ids"], padded["attention_mask"], None),
               "packed": (packed.input_ids, None, packed.segment_ids)}
    for name, (ids, mask, seg) in layouts.items():
        ids, mask, seg = (None if x is None else jnp.asarray(x) for x in (ids, mask, seg))
        out[f"jax_{name}_forward"] = real / _time(lambda: fwd_jit(ids, mask, seg).block_until_ready(), repeats)
        state = {"p": jax.tree.map(jnp.copy, params), "o": jax.tree.map(jnp.copy, opt_state)}

        def one():
            state["p"], state["o"], loss = step_jit(state["p"], state["o"], ids, mask, seg, ids)
            loss.block_until_ready()

        out[f"jax_{name}_train"] = real / _time(one, repeats)
    return out


def bench_torch(cfg: dict, seqs, padded, repeats: int, dtype: str) -> dict[str, float]:
    try:
        import torch
        import transformers
    except ImportError:
        return {}
    real = sum(len(s) for s in seqs)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = transformers.BertConfig(**cfg, attn_implementation="sdpa")
    ids = torch.tensor(padded["input_ids"], dtype=torch.long, device=device)
    mask = torch.tensor(padded["attention_mask"], dtype=torch.long, device=device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    encoder = transformers.BertModel(config).to(device).eval()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def fwd():
        with torch.no_grad(), autocast:
            encoder(input_ids=ids, attention_mask=mask)
        sync()

    out = {"torch_padded_forward": real / _time(fwd, repeats)}
    del encoder
    model = transformers.BertForMaskedLM(config).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    labels = ids.masked_fill(mask == 0, -100)

    def step():
        with autocast:
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()

    out["torch_padded_train"] = real / _time(step, repeats)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="tiny BERT and batch (CPU, < 1 min)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                    help="compute dtype (default: bfloat16 on GPU/TPU, float32 on CPU)")
    ap.add_argument("--attention-impl", default="auto", choices=("xla", "cudnn", "pallas", "auto"))
    ap.add_argument("--no-torch", action="store_true", help="skip the transformers baseline")
    args = ap.parse_args(argv)
    cfg = SMALL if args.small else BASE
    batch = args.batch or 32
    length = args.seq_len or (128 if args.small else 512)
    repeats = args.repeats or (5 if args.small else 10)
    dtype_name = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    dtype = jnp.bfloat16 if dtype_name == "bfloat16" else jnp.float32
    seqs, padded, packed = make_batch(batch, length, cfg["vocab_size"])
    pad_fraction = 1 - sum(map(len, seqs)) / padded["input_ids"].size
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), dtype {dtype_name}, "
          f"{'small' if args.small else 'bert-base'} config")
    print(f"batch {batch} x {length}: {sum(map(len, seqs))} real tokens, padding {pad_fraction:.0%} of the padded "
          f"layout; packed into {packed.input_ids.shape[0]} rows (fill {packed.fill:.0%})")
    results = bench_jax(cfg, seqs, padded, packed, repeats, dtype, args.attention_impl)
    if not args.no_torch:
        results.update(bench_torch(cfg, seqs, padded, repeats, dtype_name))
    print(f"{'path':28s} {'real tokens/s':>14s}")
    for k, v in results.items():
        print(f"{k:28s} {v:14,.0f}")
    for kind in ("forward", "train"):
        ratio = results[f"jax_packed_{kind}"] / results[f"jax_padded_{kind}"]
        print(f"packed / padded ({kind}): {ratio:.2f}x" + (
            f"; packed / torch SDPA: {results[f'jax_packed_{kind}'] / results[f'torch_padded_{kind}']:.2f}x"
            if f"torch_padded_{kind}" in results else ""))
    summary = {"device": jax.devices()[0].device_kind, "dtype": dtype_name, "batch": batch, "seq_len": length,
               "pad_fraction": round(pad_fraction, 3), **{k: round(v, 1) for k, v in results.items()}}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
