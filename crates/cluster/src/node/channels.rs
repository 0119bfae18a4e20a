//! Messaging: typed channels, request channels and acknowledged channels.

use super::*;

impl Node {
    /// A typed channel named `name`: messages of type `T` (postcard) sent
    /// with the [`Sender`] arrive at the [`Receiver`] of the node they are
    /// sent to. The id is derived from the name, so nodes may register
    /// channels in any order. Received messages wait in a queue of
    /// `limits.channel_queue`; when it is full the node stops reading from
    /// the network and the senders wait (nothing is dropped).
    ///
    /// # Errors
    /// [`Error::ChannelTaken`] when `name` (or a name with the same id) is
    /// registered here already, [`Error::BadChannelName`].
    pub fn channel<T: Serialize + DeserializeOwned>(
        &self,
        name: &str,
    ) -> Result<(Sender<T>, Receiver<T>), Error> {
        if name.is_empty() || name.len() > wire::MAX_NAME_LEN {
            return Err(Error::BadChannelName(name.len()));
        }
        let id = wire::channel_id(name);
        let name: Arc<str> = Arc::from(name);
        let (tx, rx) = mpsc::channel(self.shared.config.limits.channel_queue);
        let decode_errors = Arc::new(AtomicU64::new(0));
        {
            let mut map = self
                .shared
                .channels
                .map
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if map.contains_key(&id) {
                return Err(Error::ChannelTaken {
                    name: name.to_string(),
                    id,
                });
            }
            map.insert(
                id,
                ChannelEntry {
                    tx,
                    name: Arc::clone(&name),
                },
            );
        }
        let sender = Sender {
            shared: Arc::clone(&self.shared),
            id,
            name: Arc::clone(&name),
            _type: PhantomData,
        };
        let receiver = Receiver {
            rx,
            table: Arc::clone(&self.shared.channels),
            id,
            name,
            decode_errors,
            _type: PhantomData,
        };
        Ok((sender, receiver))
    }

    /// A request channel named `name`: [`Requester::ask_owner`](crate::Requester::ask_owner) sends a
    /// request of type `Q` to the owner of a datum (routed, forwarded and
    /// held like [`Sender::send_to_owner`]), [`Requester::ask`](crate::Requester::ask) to a named
    /// node; the application that takes it from [`Requests::recv`](crate::Requests::recv) answers
    /// with a `R`, which goes straight back to the node that asked,
    /// whoever forwarded the ask. Typed errors: timeout, refused, peer gone,
    /// no owner (see [`RequestError`](crate::RequestError)). Every node that
    /// asks or answers registers the channel.
    ///
    /// It uses two channels, `name` and `name` + `"\u{1f}answer"`.
    ///
    /// # Errors
    /// As [`Node::channel`]; [`Error::BadChannelName`] also for a name
    /// longer than 248 bytes.
    pub fn request_channel<Q, R>(&self, name: &str) -> Result<RequestChannel<Q, R>, Error>
    where
        Q: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
    {
        if name.len() > request::MAX_REQUEST_CHANNEL_NAME {
            return Err(Error::BadChannelName(name.len()));
        }
        let asks = self.channel(name)?;
        let answers = self.channel(&request::answer_channel(name))?;
        Ok(request::request_channel(
            asks,
            answers,
            self.shared.view_rx.clone(),
            Arc::clone(&self.shared.name_arc),
        ))
    }

    /// A channel whose sends resolve once the receiving application took
    /// the message: [`AckedSender::send_to_owner`] and
    /// [`AckedSender::send_to`] wait for the [`AckedReceiver`] on the
    /// other side to return it from `recv`, or fail with the reason
    /// (timeout, no owner, peer gone, …). The fire-and-forget
    /// [`Node::channel`] stays the cheaper choice where a lost message is
    /// acceptable.
    ///
    /// # Errors
    /// As [`Node::request_channel`].
    pub fn acked_channel<T>(&self, name: &str) -> Result<(AckedSender<T>, AckedReceiver<T>), Error>
    where
        T: Serialize + DeserializeOwned,
    {
        Ok(request::acked_channel(self.request_channel::<T, ()>(name)?))
    }
}
