"""rag-resilience."""
