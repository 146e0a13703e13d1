"""Network building blocks mirroring ``trellis2/modules`` (sparse tensor/conv, attention, norms, ...)."""
