import numpy as np

from flax_detector.data.synthetic import SyntheticSource, generator_kernel, upsample_transposed


def test_records_are_deterministic_and_balanced():
  first, second = SyntheticSource("train", 10, 64, 96), SyntheticSource("train", 10, 64, 96)
  for index in range(10):
    np.testing.assert_array_equal(first[index][0], second[index][0])
  assert np.bincount(first.labels).tolist() == [5, 5]
  assert not np.array_equal(first[0][0][:32, :32], SyntheticSource("test", 10, 64, 96)[0][0][:32, :32])


def test_bilinear_kernel_is_trace_free_and_generator_kernel_keeps_mean_gain():
  flat = np.full((6, 6, 1), 100.0)
  np.testing.assert_allclose(upsample_transposed(flat, generator_kernel(0.0)), 100.0)
  fingerprinted = upsample_transposed(flat, generator_kernel(0.04))
  assert np.ptp(fingerprinted) > 5  # a periodic pattern appears on flat colour ...
  np.testing.assert_allclose(fingerprinted.mean(), 100.0, rtol=1e-9)  # ... without shifting the colour


def _features(source, indices):
  colour_and_size = []
  period_two = []
  for index in indices:
    image = source[index][0].astype(np.float64)
    colour_and_size.append(np.concatenate([image.mean((0, 1)), image.std((0, 1)), image.shape[:2]]))
    # Energy of the (-1)^(x+y) and (-1)^x, (-1)^y components: where a stride-2 upsampler leaves its trace.
    gray = image.mean(-1)
    h, w = gray.shape
    signs = [
      np.outer((-1) ** np.arange(h), (-1) ** np.arange(w)),
      np.outer(np.ones(h), (-1) ** np.arange(w)),
      np.outer((-1) ** np.arange(h), np.ones(w)),
    ]
    period_two.append([abs((gray * s).mean()) for s in signs])
  return np.asarray(colour_and_size), np.asarray(period_two)


def _nearest_centroid_accuracy(train_x, train_y, test_x, test_y):
  mean, std = train_x.mean(0), train_x.std(0) + 1e-9
  train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
  centroids = np.stack([train_x[train_y == c].mean(0) for c in (0, 1)])
  predicted = np.argmin(((test_x[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
  return (predicted == test_y).mean()


def test_only_the_fingerprint_separates_the_classes():
  source = SyntheticSource("train", 1200, 64, 128)
  train, test = np.arange(0, 800), np.arange(800, 1200)
  colour_train, trace_train = _features(source, train)
  colour_test, trace_test = _features(source, test)
  labels = source.labels
  colour_accuracy = _nearest_centroid_accuracy(colour_train, labels[train], colour_test, labels[test])
  trace_accuracy = _nearest_centroid_accuracy(trace_train, labels[train], trace_test, labels[test])
  assert 0.4 <= colour_accuracy <= 0.6, colour_accuracy  # colour and size: chance
  assert trace_accuracy >= 0.8, trace_accuracy  # the periodic trace is there to be learnt
