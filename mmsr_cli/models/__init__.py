"""Models: HAN-GNN layers, MMSR, and baselines behind one interface (see base.py)."""
