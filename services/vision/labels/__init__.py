"""Label vocabularies, label files and labelled datasets (folders, dataset.json, images.txt)."""
