"""wsgi_async's benchmarks: every contender measured side by side, in one run."""
