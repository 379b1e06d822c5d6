"""The `qwen3omni` command: `demo` (no weights needed) and `chat` (a real checkpoint)."""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qwen3omni", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the tiny random model end to end (no weights, no network)")
    demo.add_argument("--out", default="reply.wav", help="where to write the spoken reply (24 kHz wav)")
    demo.add_argument("--seed", type=int, default=0)

    chat = sub.add_parser("chat", help="talk to a released checkpoint")
    chat.add_argument("--model", required=True, help="checkpoint folder (config.json, safetensors, tokenizer)")
    chat.add_argument("--text", default=None)
    chat.add_argument("--audio", action="append", default=[], help="audio file (repeatable)")
    chat.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    chat.add_argument("--video", action="append", default=[], help="video file (repeatable)")
    chat.add_argument("--system", default="You are Qwen-Omni, a helpful assistant.")
    chat.add_argument("--use-audio-in-video", action="store_true")
    chat.add_argument("--speaker", default="ethan")
    chat.add_argument("--out", default="reply.wav")
    chat.add_argument("--stream", action="store_true", help="print text and write speech as they are produced")
    chat.add_argument("--no-audio", action="store_true")
    chat.add_argument("--device", default="cuda" if _cuda() else "cpu")
    chat.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    chat.add_argument("--max-new-tokens", type=int, default=512)
    chat.add_argument("--do-sample", action="store_true")
    chat.add_argument("--attention", default="sdpa", choices=["sdpa", "flash", "eager"],
                      help="attention backend (flash needs the flash-attn package and a CUDA GPU)")
    chat.add_argument("--compile", action="store_true",
                      help="torch.compile the decode steps (faster decoding on a GPU after a one-off compile)")
    args = parser.parse_args(argv)
    from .errors import Qwen3OmniError

    try:
        return _demo(args) if args.command == "demo" else _chat(args)
    except Qwen3OmniError as e:  # bad arguments, files or checkpoints: one clear line, not a traceback
        print(f"qwen3omni {args.command}: error: {e}", file=sys.stderr)
        return 2


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


def _demo(args) -> int:
    from .demo import run_demo

    report = run_demo(args.out, seed=args.seed)
    print(json.dumps(report, indent=2))
    return 0


def _chat(args) -> int:
    import soundfile
    import torch

    from .model.omni import Qwen3Omni
    from .processing import Processor

    content = [{"type": "audio", "audio": a} for a in args.audio]
    content += [{"type": "image", "image": i} for i in args.image]
    content += [{"type": "video", "video": v} for v in args.video]
    if args.text:
        content.append({"type": "text", "text": args.text})
    if not content:
        print("qwen3omni chat: give at least one of --text, --audio, --image, --video", file=sys.stderr)
        return 2
    conversation = [{"role": "system", "content": [{"type": "text", "text": args.system}]},
                    {"role": "user", "content": content}]
    processor = Processor.from_pretrained(args.model)
    model = Qwen3Omni.from_pretrained(args.model, dtype=getattr(torch, args.dtype), device=args.device,
                                      progress=True, attention=args.attention)
    if args.compile:
        model.compile_decoding()
    batch = processor(conversation, use_audio_in_video=args.use_audio_in_video)
    batch = {k: v.to(args.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    kw = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, speaker=args.speaker,
              return_audio=not args.no_audio and model.has_talker)
    start = time.perf_counter()
    if args.stream:
        tokens, audio, first = [], [], None
        for event in model.stream(**batch, **kw):
            if event.kind == "text":
                tokens.extend(event.data.tolist())
                print(processor.decode(event.data, skip_special_tokens=True), end="", flush=True)
            else:
                first = first if first is not None else time.perf_counter() - start
                audio.append(event.data)
        print()
        wave = torch.cat(audio) if audio else None
        if first is not None:
            print(f"[first audio after {first:.2f} s]", file=sys.stderr)
    else:
        out = model.generate(**batch, **kw)
        answer = out.sequences[0, batch["input_ids"].shape[1]:]
        print(processor.decode(answer, skip_special_tokens=True))
        wave = out.audio[0] if out.audio else None
    if wave is not None and wave.numel():
        soundfile.write(args.out, wave.numpy(), 24000)
        seconds = wave.numel() / 24000
        elapsed = time.perf_counter() - start
        print(f"[wrote {seconds:.1f} s of speech to {args.out}; real-time factor {elapsed / seconds:.2f}]",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
