"""The model registry: MLflow's Model Registry plus what serving needs from it (see docs/registry.md).

    vision.registry.store.RegistryStore       register, promote, rollback, download-and-verify (imports MLflow)
    vision.registry.publisher.RegistryPublisher  `vision serve --model models:/NAME@alias`: resolve, gate, follow
    vision.registry.golden                    golden outputs and the promotion gate
    vision.registry.package                   a version's files and their sha256
    vision.registry.uri                       names, models:/ URIs, default store location
    vision.registry.status.RegistryStatus     what ListModels shows (ModelInfo.registry)

Importing this package imports nothing heavy; MLflow loads only when a store is opened.
"""
