"""Figures and tables of the paper for your own runs: masks (Fig. 2), CKA (Fig. 6), cost (Table 7), study (Fig. 5, Table 1).

Each tool is a module runnable as `python -m analysis.<tool>` and importable; plotting needs the `analysis` extra
(matplotlib).
"""
