"""`pretrain generate CHECKPOINT --prompt TEXT`: see what a trained model learned.

    gpt   continues the prompt (temperature, top-k, top-p; KV cache)
    t5    fills the sentinel spans written in the prompt, e.g. "def <extra_id_0>(self):"
          (a prompt without one gets <extra_id_0> at its end: a continuation)
    bert  fills the [MASK] tokens written in the prompt and lists the top candidates
"""

from __future__ import annotations

import argparse
import sys


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="sample from a trained checkpoint", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="run directory (its latest checkpoint) or "
                                      "checkpoints/step-N directory")
    p.add_argument("--prompt", required=True, help="text; special tokens ([MASK], "
                                                   "<extra_id_0>, ...) are recognized")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", action="store_true", help="gpt: recompute the prefix each step")
    p.add_argument("--data-dir", default=None,
                   help="where the run's tokenizer is now (default: the run's data.dir)")


def run(args: argparse.Namespace) -> int:
    from tokenizers import Tokenizer

    from pretrain import generation as gen
    from pretrain.saved_model import SavedModelError, load_trained

    try:
        saved = load_trained(args.checkpoint, args.data_dir)
        sampling = gen.Sampling(args.temperature, args.top_k, args.top_p, args.seed)
        tok = Tokenizer.from_file(str(saved.tokenizer_file))  # parses special tokens
        text = _run_family(saved, tok, args, sampling, gen)
    except (SavedModelError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text)
    return 0


def _run_family(saved, tok, args, sampling, gen) -> str:
    model, info = saved.model, saved.tokenizer
    family = saved.config.model.family
    special = info.special_tokens
    prompt = tok.encode(args.prompt, add_special_tokens=False).ids
    decode = lambda ids: tok.decode(ids, skip_special_tokens=False)  # noqa: E731
    if family == "gpt":
        new = gen.generate_gpt(model, prompt, max_new_tokens=args.max_new_tokens,
                               eos_id=info.eos_id, sampling=sampling,
                               use_cache=not args.no_cache)
        return decode(prompt + new)
    if family == "bert":
        mask = special["[MASK]"]
        if mask not in prompt:
            raise ValueError("the prompt has no [MASK]: write [MASK] where BERT should fill in")
        ids = [special["[CLS]"], *prompt, special["[SEP]"]][: model.cfg.max_seq_len]
        filled, candidates = gen.fill_masks(model, ids, mask_id=mask, sampling=sampling)
        lines = [decode(filled[1:-1])]
        for k, cands in enumerate(candidates):
            shown = ", ".join(f"{decode([i])!r} {p:.2f}" for i, p in cands)
            lines.append(f"  [MASK] {k}: {shown}")
        return "\n".join(lines)
    sentinels = []  # <extra_id_0>, <extra_id_1>, ... in order
    while f"<extra_id_{len(sentinels)}>" in special:
        sentinels.append(special[f"<extra_id_{len(sentinels)}>"])
    if not any(t in sentinels for t in prompt):
        prompt = prompt + sentinels[:1]
    inputs = prompt + [info.eos_id]
    targets = gen.generate_t5(model, inputs, max_new_tokens=args.max_new_tokens,
                              start_id=info.pad_id, eos_id=info.eos_id, sampling=sampling)
    filled = gen.fill_spans(prompt, targets, sentinels)
    return f"{decode(filled)}\n  spans: {decode(targets)}"
