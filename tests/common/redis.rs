//! Starts a private redis-server on a free loopback port. Written by the Redis tests helper.
