"""VGG16's 3x3 convolutions one by one, forward and both gradients, in XLA, oneDNN (from JAX) and PyTorch.

  pip install -e ".[bench]"
  python -m benchmarks.conv_kernels                          # full width at 64 px, batch 32, float32
  python -m benchmarks.conv_kernels --width_multiplier=0.125 # the cpu preset's convolutions
  python -m benchmarks.conv_kernels --dtype=bfloat16

Issue 10's CPU target (the train step at 1.2x PyTorch eager) rests on the convolution kernels each side
calls: XLA's (YNNPACK in jaxlib 0.10.2) and PyTorch's (oneDNN). This times each piece of each distinct
convolution of the model alone, same shape and dtype, NHWC (channels_last) on both sides, the two sides'
rounds alternating and the best round of each kept, then sums them over the model's layers. After a jaxlib
upgrade it says in a minute or two whether the kernels, and so the step comparison of
`python -m flax_detector.benchmark --compare_torch`, have moved. Where libdnnl loads (x86-64 Linux) a third
column times the trainer's oneDNN path (flax_detector.convolution): the same oneDNN kernels PyTorch calls,
plus the cost of reaching them from a jitted program (an XLA custom call on its own buffers). All sides
share one process, and so the trainer's allocator settings (flax_detector.host_allocator). Without PyTorch
only the JAX sides run.
"""

import argparse
import collections
import time
from collections.abc import Callable

import jax

from flax_detector import compilation, compute_library, convolution, host_allocator
from flax_detector.models import VGG16_STAGES, scaled_width

PIECES = ("forward", "input gradient", "weight gradient")
_NHWC = ("NHWC", "HWIO", "NHWC")


def model_convolutions(width_multiplier: float, image_size: int) -> collections.Counter[tuple[int, int, int]]:
  """(input channels, output channels, side) of every 3x3 convolution of VGG16, with how many layers share it."""
  shapes: collections.Counter[tuple[int, int, int]] = collections.Counter()
  channels, side = 3, image_size
  for stage in VGG16_STAGES:
    for width in stage:
      out = scaled_width(width, width_multiplier)
      shapes[(channels, out, side)] += 1
      channels = out
    side //= 2
  return shapes


def jax_pieces(
  batch: int, shape: tuple[int, int, int], dtype: str, conv_general_dilated: Callable[..., jax.Array]
) -> tuple[dict[str, Callable[[], object]], dict[str, str]]:
  """The three pieces as compiled JAX calls on resident arrays (each blocks until its result is ready), and
  the library that computes each: YNNPACK or XLA's own Eigen convolution (which jaxlib 0.10.2 keeps for
  convolutions of at most 16 feature channels), or oneDNN through flax_detector.convolution's callbacks."""
  cin, cout, side = shape
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (batch, side, side, cin), dtype)
  w = (jax.random.normal(keys[1], (3, 3, cin, cout)) * (2 / (9 * cout)) ** 0.5).astype(dtype)
  g = jax.random.normal(keys[2], (batch, side, side, cout), dtype)

  def conv(x: jax.Array, w: jax.Array) -> jax.Array:
    return conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_NHWC)

  calls = {
    "forward": (conv, (x, w)),
    "input gradient": (lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0], (x, w, g)),
    "weight gradient": (lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0], (x, w, g)),
  }
  runs, kernels = {}, {}
  for piece, (function, args) in calls.items():
    compiled = jax.jit(function).lower(*args).compile()
    runs[piece] = lambda compiled=compiled, args=args: jax.block_until_ready(compiled(*args))
    hlo = compiled.as_text()
    kernels[piece] = "oneDNN" if "callback" in hlo else "YNNPACK" if "__ynn_fusion" in hlo else "Eigen"
  return runs, kernels


def torch_pieces(batch: int, shape: tuple[int, int, int], dtype: str) -> dict[str, Callable[[], object]]:
  """The same pieces through aten's convolution and convolution_backward, the ops PyTorch's autograd calls."""
  import torch  # pylint: disable=g-import-not-at-top

  cin, cout, side = shape
  torch_dtype = getattr(torch, dtype)
  generator = torch.Generator().manual_seed(0)
  x = torch.randn(batch, cin, side, side, generator=generator).to(torch_dtype, memory_format=torch.channels_last)
  w = torch.randn(cout, cin, 3, 3, generator=generator).to(torch_dtype, memory_format=torch.channels_last)
  g = torch.randn(batch, cout, side, side, generator=generator).to(torch_dtype, memory_format=torch.channels_last)
  conv_args = ([1, 1], [1, 1], [1, 1], False, [0, 0], 1)  # stride, padding, dilation, transposed, out pad, groups

  def backward(mask: list[bool]) -> Callable[[], object]:
    return lambda: torch.ops.aten.convolution_backward(g, x, w, [cout], *conv_args, [*mask, False])

  # No tensor requires a gradient, so no call records an autograd graph.
  return {
    "forward": lambda: torch.ops.aten.convolution(x, w, None, *conv_args),
    "input gradient": backward([True, False]),
    "weight gradient": backward([False, True]),
  }


def elapsed_ms(run: Callable[[], object]) -> float:
  start = time.perf_counter()
  run()
  return (time.perf_counter() - start) * 1e3


def measure(sides: dict[str, dict[str, Callable[[], object]]], rounds: int) -> dict[str, dict[str, float]]:
  """Best of `rounds` per side and piece, the sides' calls alternating so a busy machine slows both alike."""
  for pieces in sides.values():  # compile and warm up
    for run in pieces.values():
      run()
  best = {name: {piece: float("inf") for piece in PIECES} for name in sides}
  for _ in range(rounds):
    for piece in PIECES:
      for name, pieces in sides.items():
        best[name][piece] = min(best[name][piece], elapsed_ms(pieces[piece]))
  return best


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--width_multiplier", type=float, default=1.0)
  parser.add_argument("--image_size", type=int, default=64)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  parser.add_argument("--rounds", type=int, default=4)
  parser.add_argument("--threads", type=int, default=0, help="PyTorch threads; 0 keeps its default")
  args = parser.parse_args()
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    torch = None
    print("PyTorch is not installed (pip install -e '.[bench]'): timing the JAX side alone.")
  if torch is not None and args.threads:
    torch.set_num_threads(args.threads)
  sides = {"XLA": jax.lax.conv_general_dilated}
  if args.dtype == "float32" and compute_library.onednn_unusable_reason() is None:
    sides["oneDNN"] = convolution.onednn_conv_general_dilated
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}", f"torch {torch.__version__}" if torch else "")
  names = [*sides, *(["PyTorch"] if torch else [])]
  print(f"batch {args.batch_size}, {args.dtype}, ms per call, best of {args.rounds}: {' / '.join(names)}")
  totals = collections.Counter()
  for shape, layers in model_convolutions(args.width_multiplier, args.image_size).items():
    runs, kernels = {}, {}
    for name, conv_general_dilated in sides.items():
      runs[name], kernels[name] = jax_pieces(args.batch_size, shape, args.dtype, conv_general_dilated)
    if torch is not None:
      runs["PyTorch"] = torch_pieces(args.batch_size, shape, args.dtype)
    best = measure(runs, args.rounds)
    cells = []
    for piece in PIECES:
      for name in names:
        totals[name] += layers * best[name][piece]
      times = " / ".join(f"{best[name][piece]:.1f}" for name in names)
      cells.append(f"{piece} ({kernels['XLA'][piece]}) {times}")
    cin, cout, side = shape
    print(f"{cin:>4}->{cout:<4} at {side:>3}px x{layers}: " + ", ".join(cells), flush=True)
  summary = ", ".join(f"{name} {totals[name]:.0f} ms" for name in names)
  print(f"all of the model's convolutions, three pieces each: {summary}")
  if torch is not None:
    print(", ".join(f"{name} {totals[name] / totals['PyTorch']:.2f}x PyTorch's time" for name in sides))


if __name__ == "__main__":
  host_allocator.keep_freed_memory_mapped()  # as the trainer runs, before JAX starts
  compilation.generate_cpu_code_at_o2()
  main()
