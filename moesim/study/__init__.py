"""Studies over many runs: comparing runs (:mod:`moesim.study.compare`), sweeping a grid of
settings (:mod:`moesim.study.sweep`), and the notebook API over both (:mod:`moesim.study.api`,
exported as ``moesim.compare`` and ``moesim.sweep``)."""
