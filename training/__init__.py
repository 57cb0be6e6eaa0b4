"""Fine-tune jobs, above the registry they publish to: trainers (tagging, classification, retrieval, DELF), datasets, the generated shapes set."""
