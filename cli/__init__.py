"""The ``flat-ray`` command line: a thin click layer over :mod:`flat_ray`."""
