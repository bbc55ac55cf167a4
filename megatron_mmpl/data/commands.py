"""`mmpl data synth | build | inspect`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_mmpl.data.shards import parse_length
from megatron_mmpl.data.tokenizer import load_tokenizer

TARGET_HELP = "target lengths in tokens, comma-separated (e.g. 32k,64k,128k)"


def _lengths(s: str) -> list[int]:

    return [parse_length(x) for x in s.split(",") if x.strip()]


def _common(p: argparse.ArgumentParser, tokenizer_default: str) -> None:
    p.add_argument("--out", required=True, help="output shard directory (written atomically)")
    p.add_argument("--targets", default="8k,16k,32k", help=TARGET_HELP)
    p.add_argument("--tokenizer", default=tokenizer_default,
                   help="qwen2 (Qwen2.5-VL vocab, offline) | tiny | tiny:<first_added_id> | a checkpoint directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bucket-edges", default=None, help="length bucket edges (default 8k,16k,32k,48k,64k,96k,128k,"
                                                        "256k,512k)")
    p.add_argument("--min-pixels", type=int, default=56 * 56)
    p.add_argument("--max-pixels", type=int, default=28 * 28 * 1280)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def register(subparsers) -> None:
    p = subparsers.add_parser("data", help="synthesise, build and inspect long-document shards")
    sub = p.add_subparsers(dest="data_command", required=True)

    s = sub.add_parser("synth", help="synthetic long documents (rendered text pages, or the visual needle)")
    _common(s, tokenizer_default="")
    s.add_argument("--kind", choices=("text", "needle"), default="text")
    s.add_argument("--per-target", type=int, default=4, help="samples per (target length, task)")
    s.add_argument("--tasks", default="extract_single,extract_multi,reason,ocr_transcribe")
    s.add_argument("--n-colours", type=int, default=4, help="needle: answer colours (chance = 1/n)")
    s.add_argument("--page-px", type=int, default=56, help="needle: page side in pixels (multiple of 28)")
    s.add_argument("--manifest", action="store_true",
                   help="write page-image documents + manifest.jsonl (input for `mmpl data build`) instead of shards")
    s.set_defaults(func=_synth)

    b = sub.add_parser("build", help="manifest of documents + QA → samples at target lengths → shards")
    _common(b, tokenizer_default="qwen2")
    b.add_argument("--manifest", required=True, help="JSONL: {doc_id, pages | pdf + page_range, qa: [...]}")
    b.add_argument("--max-seq-len", default=None, help="refuse targets longer than this (e.g. 128k)")
    b.add_argument("--mode", choices=("document", "haystack"), default="document",
                   help="document: the QA's own document in order (cut to a window holding the evidence, or joined "
                        "with the next documents); haystack: the evidence pages among pages of other documents")
    b.add_argument("--image-format", choices=("png", "jpeg", "webp"), default="png", help="how pages are stored")
    b.add_argument("--image-quality", default="90", help="1-100 for jpeg/webp, or 'lossless' (webp)")
    b.add_argument("--ocr-from-pdf", action="store_true",
                   help="also make ocr_transcribe samples whose answer is a PDF page's text layer")
    b.add_argument("--workers", type=int, default=1, help="build processes (documents are spread over them)")
    b.add_argument("--resume", action="store_true",
                   help="continue a killed build of the same manifest and settings (finished shards are kept)")
    b.add_argument("--strict", action="store_true",
                   help="stop at the first bad input (unreadable PDF/image, page out of range, QA without evidence) "
                        "instead of skipping and counting it")
    b.add_argument("--shard-mb", type=float, default=256, help="target shard size in MiB")
    b.set_defaults(func=_build)

    i = sub.add_parser("inspect", help="print the index and a length histogram")
    i.add_argument("shards", help="shard directory")
    i.add_argument("--png", default=None, help="histogram PNG path (default <shards>/length_hist.png)")
    i.add_argument("--no-png", action="store_true")
    i.add_argument("--debug", action="store_true")
    i.set_defaults(func=_inspect)


def _setup(args):
    from megatron_mmpl.data.images import ImageProcessor, ImageProcessorConfig

    tok = load_tokenizer(args.tokenizer)
    improc = ImageProcessor(ImageProcessorConfig(min_pixels=args.min_pixels, max_pixels=args.max_pixels))
    edges = _lengths(args.bucket_edges) if args.bucket_edges else None
    return tok, improc, edges


def _synth(args) -> int:
    if not args.tokenizer:
        args.tokenizer = "tiny" if args.kind == "needle" else "qwen2"
    if args.manifest:
        from megatron_mmpl.data.build import write_synth_manifest

        print(f"wrote {write_synth_manifest(args.out, seed=args.seed)}")
        return 0
    from megatron_mmpl.data.inspect import summary
    from megatron_mmpl.data.synth import write_synth

    tok, improc, edges = _setup(args)
    index = write_synth(args.out, targets=_lengths(args.targets), per_target=args.per_target, tokenizer=tok,
                        tokenizer_name=args.tokenizer, improc=improc, seed=args.seed, kind=args.kind,
                        tasks=[t for t in args.tasks.split(",") if t], bucket_edges=edges, n_colours=args.n_colours,
                        page_px=args.page_px, overwrite=args.overwrite)
    print(summary(index))
    if args.kind == "needle":
        print(f"needle: answer is one of {args.n_colours} colour words, chance accuracy {1 / args.n_colours:.3f}")
    return 0


def _build(args) -> int:

    from megatron_mmpl.data.build import write_build
    from megatron_mmpl.data.inspect import inspect
    from megatron_mmpl.data.page_codec import parse_quality
    from megatron_mmpl.data.shards import parse_length  # lazy: CLI start-up

    if args.workers < 1:
        raise ValueError(f"--workers {args.workers}: use 1 or more processes")
    tok, improc, edges = _setup(args)
    write_build(args.manifest, args.out, targets=_lengths(args.targets), tokenizer=tok, tokenizer_name=args.tokenizer,
                improc=improc, seed=args.seed, max_seq_len=parse_length(args.max_seq_len) if args.max_seq_len else None,
                bucket_edges=edges, overwrite=args.overwrite, shard_bytes=int(args.shard_mb * (1 << 20)),
                mode=args.mode, image_format=args.image_format, image_quality=parse_quality(args.image_quality),
                ocr_from_pdf=args.ocr_from_pdf, workers=args.workers, resume=args.resume, strict=args.strict,
                progress=sys.stderr.isatty())
    print(inspect(args.out))
    return 0


def _inspect(args) -> int:

    from megatron_mmpl.data.inspect import inspect

    png = None if args.no_png else (args.png or str(Path(args.shards) / "length_hist.png"))
    print(inspect(args.shards, png))
    return 0
