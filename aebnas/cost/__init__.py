"""What a network costs: MACs per segment (ptflops) and latency tables."""
