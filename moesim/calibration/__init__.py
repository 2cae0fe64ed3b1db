"""Calibration: measure expert FFN times, memory and host-link bandwidths on a real device and
write a hardware profile whose compute costs are measured facts.

The pipeline (:func:`moesim.calibration.run.calibrate`) is the same for every backend:

1. :mod:`~moesim.calibration.plan` lists what to measure: for each expert shape and dtype, a
   grouped expert FFN over ``E`` experts at log-spaced uniform token counts (1 to 16k per
   expert) and at uneven per-expert counts (Zipf and Dirichlet draws);
2. a backend (:mod:`~moesim.calibration.backends`: ``cuda`` runs the bundled CUDA C++
   microbenchmark built with nvcc, ``torch`` uses PyTorch, ``cpu`` uses NumPy) measures it and
   returns the raw measurements (checked against a reference before timing; medians);
3. :mod:`~moesim.calibration.fit` fits a per-expert time table ``T(v) = c + sum_i f(v_i)``,
   ``f`` piecewise linear in log tokens, and checks it on held-out distributions;
4. :mod:`~moesim.calibration.profile` writes a profile citing the raw measurement file.
"""
