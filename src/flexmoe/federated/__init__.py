"""Federated runtime on Flower: methods, partitions, ClientApp/ServerApp, strategies, accounting."""
