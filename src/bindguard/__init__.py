"""bindguard: will this daemon's bind() succeed, and if not, who is in the way?"""

__version__ = "0.1.0"
