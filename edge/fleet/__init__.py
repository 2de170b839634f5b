"""Fleet-wide work on recordings: replay with the daemon's conditioning, re-scoring, golden replays."""
