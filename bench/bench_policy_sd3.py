"""Time SD3Policy calls on the tiny random SD3 pipeline (tests/sd3_tiny.py): load, encode, CFG velocity,
velocity + backward, decode. Prints median milliseconds. Usage: python bench/bench_policy_sd3.py [threads]"""
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from sd3_tiny import TINY_HEIGHT, TINY_WIDTH, build_tiny_sd3  # noqa: E402

from grpo_lib.policies.sd3 import SD3Policy  # noqa: E402


def median_ms(fn, n=20):
    fn()  # warm-up
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main():
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    with tempfile.TemporaryDirectory() as d:
        build_tiny_sd3(d)
        kw = dict(height=TINY_HEIGHT, width=TINY_WIDTH, max_sequence_length=32)
        load_ms = median_ms(lambda: SD3Policy.from_pretrained(d, **kw), n=5)
        p = SD3Policy.from_pretrained(d, **kw)
        prompts = ["three red cats", "two dogs"]
        cond = p.encode(prompts)
        x = torch.randn(2, *p.latent_shape)
        print(f"threads={torch.get_num_threads()} latent={tuple(x.shape)} "
              f"lora params={sum(q.numel() for q in p.trainable_parameters())}")
        print(f"from_pretrained (tiny, + LoRA)     {load_ms:8.2f} ms")
        print(f"encode B=2                         {median_ms(lambda: p.encode(prompts)):8.2f} ms")
        with torch.no_grad():
            print(f"velocity B=2, CFG (MMDiT batch 4)  {median_ms(lambda: p.velocity(x, 0.5, cond, 4.5)):8.2f} ms")
            print(f"velocity B=2, g=1 (MMDiT batch 2)  {median_ms(lambda: p.velocity(x, 0.5, cond, 1.0)):8.2f} ms")
            print(f"decode B=2                         {median_ms(lambda: p.decode(x)):8.2f} ms")
        fb = median_ms(lambda: p.velocity(x, 0.5, cond, 4.5).square().mean().backward())
        print(f"velocity B=2 CFG + backward        {fb:8.2f} ms")


if __name__ == "__main__":
    main()
