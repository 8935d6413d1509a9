//! A raw WebSocket client over TCP, for frames a library will not send. Written by the tests
//! helper; see tests/frames.rs.
