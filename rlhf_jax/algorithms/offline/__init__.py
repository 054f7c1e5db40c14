"""Offline methods over fixed data: the DPO family (``dpo``), listwise PRO / RRHF (``listwise``),
reward-ranked fine-tuning (``raft``) and best-of-n sampling (``best_of_n``).
"""
