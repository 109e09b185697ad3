"""Data staging: sources, tokenizer resolution, packing, webdataset shards and their manifest."""
