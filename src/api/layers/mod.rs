//! The tower layers the server stacks in front of the services: each one
//! wraps every call and knows nothing of any one RPC's messages. The order
//! they run in, and why each is there, is `app/stack.rs`'s to say.

pub mod deadline;
pub mod forwarded;
pub mod guard;
pub mod message_limit;
pub mod observe;
pub mod ready;
pub mod replay;
pub mod shed;
