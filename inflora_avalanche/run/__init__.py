"""The runner of every method: config schema (``config``), building (``build``), the loop (``loop``), resume
(``resume``), output folder (``output``), torchrun support (``parallel``), the command line (``cli``) and method
comparisons (``compare``). Importing this package imports nothing heavy; the modules are imported as needed."""
