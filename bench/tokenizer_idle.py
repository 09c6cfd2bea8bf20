"""How long one encode takes after the process has been idle, on this machine.

    python -m bench.tokenizer_idle TOKENIZER_DIR [--texts 30]

The generator's `prepare` at one caller took 5.0 ms on the lent H200 for a 512-token prompt, against
~0.5-1 ms for the same encode run back to back. On the 2-core development machine an encode after
300 ms of idling took 4-10x longer than one right after another, with no system call in between (strace),
while plain Python work did not slow down: a cold-cache effect of the tokenizer's code and tables, not
a wake-up. This prints the encode's p50 after idle gaps of 1 ms, 50 ms and 300 ms, each fresh text
(random words of the vocabulary, ~500 tokens) encoded once, then the same text again at once.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("tokenizer", help="a Hugging Face tokenizer folder")
    parser.add_argument("--texts", type=int, default=30)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    backend = AutoTokenizer.from_pretrained(args.tokenizer).backend_tokenizer
    rng = random.Random(0)
    words = [w for w in backend.get_vocab() if w.isalpha()]
    for gap_s in (0.001, 0.05, 0.3):
        first, again = [], []
        for _ in range(args.texts):
            text = " ".join(rng.choice(words) for _ in range(350))
            time.sleep(gap_s)
            started = time.perf_counter()
            n = len(backend.encode(text).ids)
            first.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            backend.encode(text + " ")
            again.append((time.perf_counter() - started) * 1000)
        print(
            f"idle {gap_s * 1000:g} ms: encode p50 {statistics.median(first):.2f} ms ({n} tokens), "
            f"the next one at once {statistics.median(again):.2f} ms",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
