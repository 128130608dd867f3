"""Example ngkit plugins: the ``shapes`` dataset, the ``patch-bernoulli`` decoder, the
``foreground-iou`` metric and the ``ngkit shapes-preview`` command (see README.md)."""
