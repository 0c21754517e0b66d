"""The method: flow matchers and OT coupling, regularizers, K-means clusters and their batches, the UNet."""
