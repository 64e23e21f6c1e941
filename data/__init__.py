"""Data preparation scripts and the token-shard format (shards.py) that they and train_gpt.py share."""
