"""The flax_detector train step in PyTorch, for a side-by-side speed comparison.

  pip install -e ".[bench]"
  python benchmarks/torch_reference.py --width_multiplier=0.125 --image_size=64 --batch_size=32 --dtype=float32

Same model (torchvision's vgg16 / vgg16_bn layout at the given width multiplier, 2-class head), same
batch of uint8 NHWC images normalised inside the step, same loss (class-weighted cross-entropy) and the
same optimizer as flax_detector.train.create_optimizer: global-norm clipping, then AdamW with a linear
warm-up and cosine schedule and weight decay on conv and linear weights only. The batch stays on the
device, so only the step is timed. `--mode=compile` wraps the step in torch.compile.

Prints one JSON object (images/s, steps/s, compile seconds, versions). flax_detector.benchmark runs
this script with `--compare_torch` and prints both sides and their ratio.
"""

import argparse
import json
import math
import time

import torch
from torch import nn

# torchvision's configuration "D" (vgg16): conv widths per stage, each stage ends in a 2x2 max pool.
VGG16_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
CLASSIFIER_WIDTH = 4096
RGB_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
RGB_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def scaled_width(width: int, multiplier: float) -> int:
  """flax_detector.models.scaled_width: the same rounding, so both sides have the same parameter count."""
  return max(1, round(width * multiplier))


def vgg16(num_classes: int, batch_norm: bool, width_multiplier: float, dropout_rate: float) -> nn.Sequential:
  """torchvision.models.vgg16(_bn) with every width scaled; built by hand so torchvision is optional."""
  layers: list[nn.Module] = []
  channels = 3
  for stage in VGG16_STAGES:
    for width in stage:
      out = scaled_width(width, width_multiplier)
      layers += [nn.Conv2d(channels, out, 3, padding=1)] + ([nn.BatchNorm2d(out)] if batch_norm else [])
      layers.append(nn.ReLU(inplace=True))
      channels = out
    layers.append(nn.MaxPool2d(2, 2))
  hidden = scaled_width(CLASSIFIER_WIDTH, width_multiplier)
  return nn.Sequential(
    *layers,
    nn.AdaptiveAvgPool2d(7),
    nn.Flatten(),
    nn.Linear(channels * 49, hidden),
    nn.ReLU(inplace=True),
    nn.Dropout(dropout_rate),
    nn.Linear(hidden, hidden),
    nn.ReLU(inplace=True),
    nn.Dropout(dropout_rate),
    nn.Linear(hidden, num_classes),
  )


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
  """optax.warmup_cosine_decay_schedule(0, 1, warmup, total, end_value=0) as a LambdaLR factor."""
  if step < warmup_steps:
    return step / warmup_steps
  progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
  return 0.5 * (1 + math.cos(math.pi * progress))


def create_optimizer(model: nn.Module, args: argparse.Namespace) -> tuple[torch.optim.Optimizer, object]:
  """AdamW with decay on conv and linear weights only (flax_detector.train._decay_mask), and its schedule."""
  decayed = [p for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) for p in [m.weight]]
  decayed_ids = {id(p) for p in decayed}
  others = [p for p in model.parameters() if id(p) not in decayed_ids]
  groups = [{"params": decayed, "weight_decay": args.weight_decay}, {"params": others, "weight_decay": 0.0}]
  # optax.adamw's defaults: b1 0.9, b2 0.999, eps 1e-8. Fused kernels where this torch has them.
  optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, betas=(0.9, 0.999), eps=1e-8, fused=True)
  schedule = torch.optim.lr_scheduler.LambdaLR(
    optimizer, lambda step: warmup_cosine(step, args.warmup_steps, args.total_steps)
  )
  return optimizer, schedule


def make_train_step(
  model: nn.Module, optimizer: torch.optim.Optimizer, schedule, args: argparse.Namespace, device: torch.device
):
  """One step on a uint8 NHWC batch: normalise, forward, weighted cross-entropy, clip, AdamW."""
  mean = torch.tensor(RGB_MEAN, device=device).view(1, 3, 1, 1)
  std = torch.tensor(RGB_STD, device=device).view(1, 3, 1, 1)
  loss_fn = nn.CrossEntropyLoss(weight=torch.ones(args.num_classes, device=device))
  autocast = args.dtype != "float32"

  def forward_backward(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    x = (images.permute(0, 3, 1, 2).float() - mean) / std  # NCHW view of NHWC memory: channels_last
    with torch.autocast(device.type, dtype=getattr(torch, args.dtype), enabled=autocast):
      loss = loss_fn(model(x).float(), labels)
    loss.backward()
    return loss

  if args.mode == "compile":
    forward_backward = torch.compile(forward_backward)

  def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    optimizer.zero_grad(set_to_none=True)
    loss = forward_backward(images, labels)
    if args.grad_clip_norm > 0:
      nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip_norm, foreach=True)
    optimizer.step()
    schedule.step()
    return loss

  return step


def synchronize(device: torch.device) -> None:
  if device.type == "cuda":
    torch.cuda.synchronize()


def measure(args: argparse.Namespace) -> dict[str, object]:
  """Images/s of the train step on a device-resident batch, after untimed warm-up steps."""
  device = torch.device(args.device)
  if args.threads > 0:
    torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  model = vgg16(args.num_classes, args.batch_norm, args.width_multiplier, args.dropout_rate)
  model = model.to(device, memory_format=torch.channels_last).train()
  optimizer, schedule = create_optimizer(model, args)
  step = make_train_step(model, optimizer, schedule, args, device)
  generator = torch.Generator().manual_seed(0)
  images = torch.randint(
    0, 256, (args.batch_size, args.image_size, args.image_size, 3), dtype=torch.uint8, generator=generator
  ).to(device)
  labels = torch.randint(0, args.num_classes, (args.batch_size,), generator=generator).to(device)
  start = time.perf_counter()
  step(images, labels)
  synchronize(device)
  first_step_seconds = time.perf_counter() - start
  for _ in range(args.warmup):
    step(images, labels)
  synchronize(device)
  start = time.perf_counter()
  for _ in range(args.steps):
    step(images, labels)
  synchronize(device)
  seconds = time.perf_counter() - start
  return {
    "torch_mode": args.mode,
    "torch_images_per_second": args.steps * args.batch_size / seconds,
    "torch_steps_per_second": args.steps / seconds,
    "torch_first_step_seconds": first_step_seconds,
    "torch_version": torch.__version__,
    "torch_threads": torch.get_num_threads(),
    "torch_device": str(device),
  }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--mode", choices=("eager", "compile"), default="eager")
  parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--image_size", type=int, default=64)
  parser.add_argument("--width_multiplier", type=float, default=1.0)
  parser.add_argument("--batch_norm", action=argparse.BooleanOptionalAction, default=True)
  parser.add_argument(
    "--dtype",
    choices=("float32", "bfloat16", "float16"),
    default="float32",
    help="Autocast compute dtype; parameters stay float32 (flax_detector's model.dtype).",
  )
  parser.add_argument("--num_classes", type=int, default=2)
  parser.add_argument("--dropout_rate", type=float, default=0.5)
  parser.add_argument("--learning_rate", type=float, default=1e-3)
  parser.add_argument("--weight_decay", type=float, default=5e-4)
  parser.add_argument("--grad_clip_norm", type=float, default=1.0)
  parser.add_argument("--warmup_steps", type=int, default=100)
  parser.add_argument("--total_steps", type=int, default=1000)
  parser.add_argument("--steps", type=int, default=10, help="Timed steps, after the warm-up.")
  parser.add_argument("--warmup", type=int, default=2, help="Untimed steps after the first (compiling) one.")
  parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0 keeps torch's default.")
  return parser.parse_args(argv)


if __name__ == "__main__":
  print(json.dumps(measure(parse_args()), sort_keys=True))
