//! The MQTT topic tree: `edgeadapt/v1/<fleet>/<device>/<leaf>`. docs/mqtt.md is the reference.

/// Topic prefix and protocol version of every message.
pub const ROOT: &str = "edgeadapt/v1";

/// One device's topics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceTopics {
    base: String,
}

impl DeviceTopics {
    pub fn new(fleet: &str, device: &str) -> DeviceTopics {
        DeviceTopics { base: format!("{ROOT}/{fleet}/{device}") }
    }

    /// Retained online/offline status; the offline message is the Last Will.
    pub fn status(&self) -> String {
        format!("{}/status", self.base)
    }

    pub fn metrics(&self) -> String {
        format!("{}/metrics", self.base)
    }

    pub fn events(&self) -> String {
        format!("{}/events", self.base)
    }

    /// Commands to the device.
    pub fn commands(&self) -> String {
        format!("{}/cmd", self.base)
    }

    pub fn responses(&self) -> String {
        format!("{}/response", self.base)
    }

    pub fn weights_manifest(&self, version: i64) -> String {
        format!("{}/weights/{version}/manifest", self.base)
    }

    pub fn weights_chunk(&self, version: i64, index: usize) -> String {
        format!("{}/weights/{version}/chunk/{index}", self.base)
    }

    /// A chunk of an artefact sent to the device (`protocol::transfer`).
    pub fn inbound_chunk(&self, transfer: &str, index: usize) -> String {
        format!("{}/in/{transfer}/{index}", self.base)
    }

    /// Every chunk sent to the device; it subscribes to this and to `cmd`.
    pub fn inbound_filter(&self) -> String {
        format!("{}/in/#", self.base)
    }

    /// The transfer and index of one of this device's inbound chunk topics.
    pub fn parse_inbound(&self, topic: &str) -> Option<(String, usize)> {
        let rest = topic.strip_prefix(&self.base)?.strip_prefix("/in/")?;
        let (transfer, index) = rest.split_once('/')?;
        let valid = transfer.len() == 32 && transfer.bytes().all(|b| b.is_ascii_hexdigit());
        valid.then_some(())?;
        Some((transfer.to_string(), index.parse().ok()?))
    }

    /// Everything the device publishes under its weights.
    pub fn weights_filter(&self) -> String {
        format!("{}/weights/#", self.base)
    }
}

/// Subscription filter for one leaf of every device of a fleet, e.g. `status`.
pub fn fleet_filter(fleet: &str, leaf: &str) -> String {
    format!("{ROOT}/{fleet}/+/{leaf}")
}

/// The device and leaf of a topic of `fleet`, e.g. `("orin-7", "status")`.
pub fn parse(fleet: &str, topic: &str) -> Option<(String, String)> {
    let rest = topic.strip_prefix(ROOT)?.strip_prefix('/')?.strip_prefix(fleet)?.strip_prefix('/')?;
    let (device, leaf) = rest.split_once('/')?;
    (!device.is_empty() && !leaf.is_empty()).then(|| (device.to_string(), leaf.to_string()))
}

/// Whether a name can be a topic level: no wildcards, separators or control characters.
pub fn valid_level(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_and_parsing_agree() {
        let topics = DeviceTopics::new("plant-3", "orin-7");
        assert_eq!(topics.status(), "edgeadapt/v1/plant-3/orin-7/status");
        assert_eq!(topics.weights_chunk(4, 2), "edgeadapt/v1/plant-3/orin-7/weights/4/chunk/2");
        assert_eq!(parse("plant-3", &topics.events()), Some(("orin-7".into(), "events".into())));
        assert_eq!(parse("plant-3", &topics.weights_manifest(4)), Some(("orin-7".into(), "weights/4/manifest".into())));
        assert_eq!(parse("plant-4", &topics.events()), None);
        assert_eq!(fleet_filter("plant-3", "status"), "edgeadapt/v1/plant-3/+/status");
        assert!(valid_level("orin-7") && !valid_level("a/b") && !valid_level("+") && !valid_level(""));
        let transfer = "0123456789abcdef0123456789abcdef";
        let chunk = topics.inbound_chunk(transfer, 7);
        assert_eq!(chunk, format!("edgeadapt/v1/plant-3/orin-7/in/{transfer}/7"));
        assert_eq!(topics.parse_inbound(&chunk), Some((transfer.to_string(), 7)));
        assert_eq!(topics.parse_inbound(&format!("edgeadapt/v1/plant-3/orin-7/in/{transfer}/x")), None);
        assert_eq!(topics.parse_inbound("edgeadapt/v1/plant-3/orin-7/in/short/1"), None);
        assert_eq!(DeviceTopics::new("plant-3", "orin-8").parse_inbound(&chunk), None, "another device's");
    }
}
