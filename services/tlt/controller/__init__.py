"""The RL job controller: step loop, progress display and report."""
