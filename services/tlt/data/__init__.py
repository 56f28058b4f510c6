"""Data for TLT: the synthetic demo reasoning task (:mod:`tlt.data.demo_task`) that the demo policy learns."""
