"""flexmoe: personalized federated fine-tuning of Mixture-of-Experts LLMs (FLEx)."""

__version__ = "0.1.0"
