"""`python -m bench`: side-by-side latency/memory comparisons, one section per subsystem."""
