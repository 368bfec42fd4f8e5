"""The search on Ray Tune: settings, searchers, schedulers, trials and what they leave on disk."""
