"""VGG16 AI-vs-human anime art detector: the training recipe.

`get_config()` is the real recipe for accelerators (224 px crops, VGG16 at full width).
`configs/vgg16.py:cpu` shrinks the network and the crops so the built-in synthetic set trains on a
2-core laptop CPU in a few minutes; it is also the preset to try a small image folder with.

Every field can be overridden on the command line, e.g. `--config.data.dir=/data/anime`.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the recipe; `arg` picks a preset ("cpu") or None for the accelerator default."""
  config = ml_collections.ConfigDict()

  config.data = data = ml_collections.ConfigDict()
  # Image folder with train/<class>/... and test/<class>/...; "" trains on the built-in synthetic set.
  data.dir = ""
  # Class folder names; the label is the index. The positive class for precision/recall is "ai-generated".
  data.class_names = ("human-art", "ai-generated")
  # Name of the class whose precision, recall and F1 are reported.
  data.positive_class = "ai-generated"
  # Share of train/ held out (by a stable hash of each file's path) for periodic validation.
  data.val_fraction = 0.1
  # "crop": keep native pixels (random crop for training, centre crop for eval, zero-pad small images).
  # "resize": scale the shorter side to image_size first. Resizing erases pixel-level generator traces.
  # Under "resize" a JPEG is decoded at 1/2, 1/4 or 1/8 scale where that still covers image_size (faster).
  data.preprocess = "crop"
  # How "crop" treats images smaller than image_size. "shared": every crop has the side that all but
  # data.shared_crop_quantile of the training images can supply (at most image_size), so no class is
  # padded more than another: on a folder whose human images are small and AI images large, zero
  # borders would otherwise mark the human class. "pad": image_size crops, smaller images zero-padded.
  data.crop_policy = "shared"
  data.shared_crop_quantile = 0.02
  # Evaluation and prediction average the model over eval_grid x eval_grid crops spread evenly over
  # each image (1: the centre crop only); the cost of evaluation grows with eval_grid squared.
  data.eval_grid = 1
  # The periodic validation while training looks at periodic_eval_grid x periodic_eval_grid crops
  # (1: the centre crop), a progress signal at a fraction of eval_grid's cost; the calibration and the
  # final test metrics always use eval_grid.
  data.periodic_eval_grid = 1
  # Probability of a horizontal flip of a training crop.
  data.flip_probability = 0.5
  # Probability of re-compressing a training crop as JPEG, and the quality range drawn from.
  data.jpeg_probability = 0.1
  data.jpeg_quality_min = 70
  data.jpeg_quality_max = 95
  # Probability of a Gaussian blur of a training crop, and the sigma range drawn from.
  data.blur_probability = 0.1
  data.blur_sigma_min = 0.1
  data.blur_sigma_max = 1.0
  # Files with more pixels than this are left out (listed in DIR/skipped_files.txt) before anything is
  # decoded: one decode of 40 M pixels is 120 MB, comfortable in a Grain worker.
  data.max_image_pixels = 40_000_000
  # What an unreadable, truncated or oversized file does: "skip" leaves it out of the splits, the class
  # counts and the weights, and lists it in DIR/skipped_files.txt; "error" stops before training.
  data.on_bad_file = "skip"
  # Grain worker processes that decode and augment; 0 decodes in the training process. -1 chooses from
  # the host: one per core this process may use (its CPU affinity) less 2 for the training process, 1 to 32.
  # Several training processes on one host each take that many: pin them to disjoint cores or set a count.
  data.worker_count = -1
  # Batches each worker prepares ahead of the training step.
  data.worker_buffer_size = 2
  # Decode train/ (with its validation share) once, before training, into one memory-mapped file that every
  # Grain worker shares (in /dev/shm, or the workdir when that is too small), instead of every epoch. For
  # data sets whose decoded pixels fit in memory, e.g. the 22k-image public set; it refuses to start, naming
  # the size, when they do not. "auto" caches only when they take at most a quarter of the free memory.
  # Augmentations still run per epoch, so batches are the same either way.
  data.cache_decoded = ml_collections.FieldReference(False, field_type=object)  # True, False or "auto"
  # Built-in synthetic set (used when data.dir is ""): records per split and image side range in px.
  data.synthetic_train_size = 4096
  data.synthetic_test_size = 1024
  data.synthetic_min_side = 96
  data.synthetic_max_side = 160

  config.model = model = ml_collections.ConfigDict()
  # BatchNorm after every conv (torchvision's vgg16_bn); False is plain VGG16.
  model.batch_norm = True
  # Scales every conv width and the 4096-wide classifier; 1.0 is VGG16 proper.
  model.width_multiplier = 1.0
  # Compute dtype of activations ("float32", "bfloat16", "float16"); parameters stay float32.
  model.dtype = "bfloat16"
  # Which library computes the convolutions, Dense layers and training BatchNorm: "auto" (oneDNN for float32 on
  # a one-device CPU run where libdnnl loads, XLA otherwise), "xla" or "onednn" (flax_detector/compute_library.py).
  model.library = "auto"
  # Dropout rate of the two hidden classifier layers (torchvision: 0.5).
  model.dropout_rate = 0.5

  # Side of the square crop the network sees, in pixels.
  config.image_size = 224
  # Global batch size, split over every device of every host; must divide by the device count.
  config.batch_size = 128
  # Global batch size for evaluation and prediction; the last partial batch is padded and masked.
  config.eval_batch_size = 256
  # Passes over the training split.
  config.num_epochs = 30
  # Small folders get more passes until the schedule spans at least this many steps: the generator
  # trace takes a few hundred steps to learn whatever the folder's size, and 15 epochs of 500 images
  # at batch 32 are only 230.
  config.min_train_steps = 1000
  # When > 0, stops after this many steps (tests and benchmarks); the schedule still spans num_epochs.
  config.num_train_steps = -1
  # Peak learning rate of AdamW, reached after the warm-up and decayed by a cosine to 0.
  config.learning_rate = 1e-4
  # Linear warm-up length, in epochs.
  config.warmup_epochs = 1.0
  # Decoupled weight decay of AdamW, applied to conv and dense kernels only.
  config.weight_decay = 5e-4
  # Gradient clipping by global norm; <= 0 disables it.
  config.grad_clip_norm = 1.0
  # Weights to start from at a fresh start (a resume restores its own checkpoint): a torchvision VGG16 or
  # VGG16-BN state dict saved as .safetensors, or a flax_detector workdir; "" initialises from seed.
  # A last layer with another class count (ImageNet's 1000) is re-initialised.
  config.init_from = ""
  # "none" trains every parameter; "features" trains only the classifier (the convolutions, their
  # BatchNorm layers and statistics stay as loaded and have no optimizer state).
  config.freeze = "none"
  # Seeds data order, augmentation, initialisation and dropout.
  config.seed = 0
  # "balanced" (n / (k * count_c) over the training split), "none", or explicit per-class weights "w0,w1".
  config.class_weights = "balanced"
  # "dp": parameters replicated on every device (data parallel).
  config.sharding = "dp"

  # How often the train_* scalars and the learning rate are written, in steps.
  config.log_every_steps = 50
  # How often the validation split is evaluated, in steps; <= 0 means once per epoch.
  config.eval_every_steps = -1
  # How often a checkpoint is saved, in steps; <= 0 means once per epoch. The last step is always saved.
  config.checkpoint_every_steps = -1
  # Checkpoints kept on disk (the newest ones).
  config.max_checkpoints_to_keep = 3

  if arg == "cpu":
    _apply_cpu_preset(config)
  elif arg not in (None, ""):
    raise ValueError(f"configs/vgg16.py: unknown preset {arg!r}; use configs/vgg16.py or configs/vgg16.py:cpu")
  return config


def _apply_cpu_preset(config: ml_collections.ConfigDict) -> None:
  """A VGG16 at 1/8 width on 64-px native crops: minutes on a 2-core CPU, same topology."""
  config.image_size = 64
  config.batch_size = 32
  config.eval_batch_size = 128
  config.num_epochs = 15
  config.min_train_steps = 500
  config.learning_rate = 1e-3
  config.warmup_epochs = 0.5
  config.model.width_multiplier = 0.125
  config.model.dtype = "float32"
  config.data.worker_count = 1
  # The synthetic set decodes to 96 MiB: decoding it once leaves both cores to the step (end to end 241 -> 373
  # images/s, benchmarks/RESULTS.md); "auto" leaves a folder that would not fit easily undecoded.
  config.data.cache_decoded = "auto"
  # 64-px crops see little of a 384-px picture: evaluate and predict on 3x3 crops per image.
  config.data.eval_grid = 3
  config.data.synthetic_train_size = 2048
  config.data.synthetic_test_size = 1024
  config.log_every_steps = 20
  # Validation every 200 steps (and at the last) instead of every epoch: on the synthetic set an epoch
  # is ~60 steps, about 12 s here, so 15 validations were more monitoring than a 4-minute run needs.
  config.eval_every_steps = 200
