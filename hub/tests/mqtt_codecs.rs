//! The MQTT codecs against what the official SDKs put on the wire
//! (`/work/shared/reference/sdk-wire-capture.md`) and edgeHub's own parser tests
//! (`MqttUsernameParserTest`, Azure/iotedge).

// Test helpers outside `#[test]` functions may panic too.
#![allow(clippy::unwrap_used)]

use hub::mqtt::username::{self, UsernameError};

const PY_USERNAME: &str = "acceptance-hub.local/edgedev/modA/?api-version=2019-10-01&DeviceClientType=azure-iot-device-iothub-py%2F2.14.0%283.11.7%3BLinux%20%231%20SMP%20PREEMPT_DYNAMIC%20%400%3Bx86_64%29";
const NODE_USERNAME: &str = "acceptance-hub.local/edgedev/modA/?api-version=2021-04-12&DeviceClientType=azure-iot-device%2F1.18.4%20(node%20v20.20.2%3B%20Debian%2012%3B%20x64)";

#[test]
fn python_sdk_username_parses() {
    let c = username::parse(PY_USERNAME).unwrap();
    assert_eq!(c.iothub_host, "acceptance-hub.local");
    assert_eq!(c.device.as_str(), "edgedev");
    assert_eq!(c.module.as_ref().map(|m| m.as_str()), Some("modA"));
    assert_eq!(c.api_version, "2019-10-01");
    assert_eq!(
        c.client_type.as_deref(),
        Some("azure-iot-device-iothub-py/2.14.0(3.11.7;Linux #1 SMP PREEMPT_DYNAMIC @0;x86_64)")
    );
    assert_eq!(c.model_id, None);
    assert_eq!(c.client_id(), "edgedev/modA");
}

#[test]
fn node_sdk_username_parses_with_its_unencoded_parentheses() {
    let c = username::parse(NODE_USERNAME).unwrap();
    assert_eq!(c.api_version, "2021-04-12");
    assert_eq!(
        c.client_type.as_deref(),
        Some("azure-iot-device/1.18.4 (node v20.20.2; Debian 12; x64)")
    );
    assert_eq!(c.client_id(), "edgedev/modA");
}

#[test]
fn python_pnp_username_carries_the_model_id() {
    let u = "hub.local/dev/?api-version=2020-09-30&DeviceClientType=py&model-id=dtmi%3Acom%3Aexample%3AThermostat%3B1";
    let c = username::parse(u).unwrap();
    assert_eq!(c.module, None);
    assert_eq!(c.client_id(), "dev");
    assert_eq!(c.model_id.as_deref(), Some("dtmi:com:example:Thermostat;1"));
}

#[test]
fn nested_edge_auth_chain_is_reported() {
    let u = "hub/child/$edgeHub/?api-version=2020-10-10&auth-chain=child%3Bparent";
    let c = username::parse(u).unwrap();
    assert_eq!(c.auth_chain.as_deref(), Some("child;parent"));
}

/// `MqttUsernameParserTest.GetUsernames`: (username, device, module, client type, model id).
#[test]
fn edgehub_accepted_usernames() {
    let cases: &[(&str, &str, &str, &str, &str)] = &[
        ("iotHub1/device1/api-version=2010-01-01&DeviceClientType=customDeviceClient1", "device1", "", "customDeviceClient1", ""),
        ("iotHub1/device1/module1/api-version=2010-01-01&DeviceClientType=customDeviceClient2", "device1", "module1", "customDeviceClient2", ""),
        ("iotHub1/device1/module1/api-version=2017-06-30/DeviceClientType=Microsoft.Azure.Devices.Client/1.5.1-preview-003", "device1", "module1", "Microsoft.Azure.Devices.Client/1.5.1-preview-003", ""),
        ("iotHub1/device1/?api-version=2010-01-01&DeviceClientType=customDeviceClient1", "device1", "", "customDeviceClient1", ""),
        ("iotHub1/device1/?api-version=2010-01-01&DeviceClientType=customDeviceClient1&model-id=testModelId", "device1", "", "customDeviceClient1", "testModelId"),
        ("iotHub1/device1/module1/?api-version=2010-01-01&DeviceClientType=customDeviceClient1", "device1", "module1", "customDeviceClient1", ""),
        ("iotHub1/device1/module1/?api-version=2010-01-01&DeviceClientType=customDeviceClient1&model-id=testModelId", "device1", "module1", "customDeviceClient1", "testModelId"),
        ("iotHub1/device1/api-version=2010-01-01&DeviceClientType1=customDeviceClient1", "device1", "", "", ""),
        ("iotHub1/device1/api-version=2010-01-01&DeviceClientType1=customDeviceClient1&model-id=testModelId", "device1", "", "", "testModelId"),
        ("iotHub1/device1/module1/api-version=2010-01-01&", "device1", "module1", "", ""),
        ("iotHub1/device1/module1/api-version=2010-01-01&model-id=testModelId", "device1", "module1", "", "testModelId"),
        ("iotHub1/device1/?api-version=2010-01-01", "device1", "", "", ""),
        ("iotHub1/device1/?api-version=2010-01-01&model-id=testModelId", "device1", "", "", "testModelId"),
        ("iotHub1/device1/module1/?api-version=2010-01-01&Foo=customDeviceClient1", "device1", "module1", "", ""),
        ("iotHub1/device1/module1/foo?bar=b1&api-version=2010-01-01&DeviceClientType=customDeviceClient1", "device1", "module1", "customDeviceClient1", ""),
    ];
    for &(u, device, module, client_type, model_id) in cases {
        let c = username::parse(u).unwrap_or_else(|e| panic!("{u}: {e}"));
        assert_eq!(c.device.as_str(), device, "{u}");
        assert_eq!(c.module.as_ref().map_or("", |m| m.as_str()), module, "{u}");
        assert_eq!(c.client_type.as_deref().unwrap_or(""), client_type, "{u}");
        assert_eq!(c.model_id.as_deref().unwrap_or(""), model_id, "{u}");
    }
}

/// `MqttUsernameParserTest.ParseUserNameErrorTest` and `NegativeUsernameTest`, plus ours.
#[test]
fn edgehub_refused_usernames() {
    for u in [
        "iotHub1/device1",
        "iotHub1/device1/fooBar",
        "iotHub1/device1/api-version",
        "iotHub1/device1/module1/fooBar",
        "iotHub1/device1/module1/api-version",
        "iotHub1/device1/module1/api-version=2017-06-30/DeviceClientType=Microsoft.Azure.Devices.Client/1.5.1-preview-003/prodInfo",
        "iotHub1/device1/module1/api-version=2017-06-30/DeviceClientType=Microsoft.Azure.Devices.Client",
        "iotHub1/device1/module1",
        "iotHub1/device1/module1?api-version=2010-01-01?DeviceClientType=customDeviceClient1",
        "iotHub1?api-version=2010-01-01&DeviceClientType=customDeviceClient1",
        "iotHub1/device1/module1/?version=2010-01-01&DeviceClientType=customDeviceClient1",
        "iotHub1//?api-version=2010-01-01&DeviceClientType=customDeviceClient1",
        "missingEverythingAfterHostname",
        "hostname/missingEverthingAfterDeviceId",
        "hostname/deviceId/missingApiVersionProperty",
        "hostname/deviceId/moduleId/missingApiVersionProperty",
        "hostname/deviceId/moduleId/stillMissingApiVersionProperty&DeviceClientType=whatever",
        "hostname/deviceId/moduleId/DeviceClientType=whatever&stillMissingApiVersionProperty",
        "hostname/deviceId/moduleId/DeviceClientType=stillMissingApiVersionProperty",
        "hostname/deviceId/moduleId/api-version=whatever/tooManySegments",
        "",
        "   ",
        "h/d/?api-version=",
        "h/d/?api-version=%20",
    ] {
        assert!(username::parse(u).is_err(), "{u:?} should be refused");
    }
}

#[test]
fn empty_module_segment_is_refused_not_taken_for_the_device() {
    assert_eq!(
        username::parse("h/d//?api-version=1"),
        Err(UsernameError::EmptyModuleId)
    );
    assert_eq!(
        username::parse("h/ /?api-version=1"),
        Err(UsernameError::EmptyDeviceId)
    );
}

mod publish_and_deliver {
    use bytes::Bytes;
    use hub::mqtt::topics::{self, InboundTopic};
    use hub::property_bag as bag;
    use proptest::prelude::*;
    use router::{DeviceId, InputName, Message, ModuleId, OutputName, Source, SystemProperty};

    const PY_OUTPUT: &str = "devices/edgedev/modules/modA/messages/events/%24.on=out1&%24.mid=capture-py-0&%24.ct=application%2Fjson&%24.ce=utf-8&run=capture-py&seq=0";
    const NODE_OUTPUT: &str = "devices/edgedev/modules/modA/messages/events/%24.on=out1&%24.mid=capture-node-0&%24.ct=application%2Fjson&%24.ce=utf-8&seq=0&run=capture-node/";

    fn ingest(topic: &str) -> Message {
        let InboundTopic::Events(e) = topics::parse_publish(topic).unwrap() else {
            panic!("not telemetry: {topic}");
        };
        assert!(e.is_from("edgedev", Some("modA")));
        bag::message_from_publish(
            &DeviceId::new("edgedev"),
            Some(&ModuleId::new("modA")),
            e.bag,
            Bytes::from_static(b"{}"),
        )
    }

    fn mod_a(output: Option<&str>) -> Source {
        Source::ModuleOutput {
            device: DeviceId::new("edgedev"),
            module: ModuleId::new("modA"),
            output: output.map(OutputName::new),
        }
    }

    /// What the Python SDK does with an input topic (`mqtt_topic_iothub.py`): input name is
    /// `unquote(parts[5])`, properties `parts[6]` split on `&` and `=`, each `unquote`d.
    fn python_reads(topic: &str) -> (String, Vec<(String, String)>) {
        let parts: Vec<&str> = topic.split('/').collect();
        assert_eq!(parts[4], "inputs");
        let unquote = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8()
                .unwrap()
                .into_owned()
        };
        let props = parts
            .get(6)
            .filter(|p| !p.is_empty())
            .map(|p| {
                p.split('&')
                    .map(|kv| {
                        let mut it = kv.split('=');
                        let k = unquote(it.next().unwrap());
                        let v = unquote(it.next().unwrap_or(""));
                        (k, v)
                    })
                    .collect()
            })
            .unwrap_or_default();
        (unquote(parts[5]), props)
    }

    /// The Node SDK dispatches an input message only if the topic matches
    /// `^devices/.*/modules/.*/inputs/.*/.*$`.
    fn node_dispatches(topic: &str) -> bool {
        let Some(rest) = topic.strip_prefix("devices/") else {
            return false;
        };
        let Some((_, rest)) = rest.split_once("/modules/") else {
            return false;
        };
        let Some((_, rest)) = rest.split_once("/inputs/") else {
            return false;
        };
        rest.contains('/')
    }

    #[test]
    fn python_output_publish_becomes_a_module_output() {
        let m = ingest(PY_OUTPUT);
        assert_eq!(m.source(), &mod_a(Some("out1")));
        assert_eq!(m.source().path(), "/messages/modules/modA/outputs/out1");
        assert_eq!(
            m.system_property(SystemProperty::MessageId),
            Some("capture-py-0")
        );
        assert_eq!(
            m.system_property(SystemProperty::ContentType),
            Some("application/json")
        );
        assert_eq!(
            m.system_property(SystemProperty::ContentEncoding),
            Some("utf-8")
        );
        assert_eq!(m.property("run"), Some("capture-py"));
        assert_eq!(m.property("seq"), Some("0"));
        assert_eq!(m.properties().len(), 2);
        assert_eq!(m.body().as_ref(), b"{}");
    }

    #[test]
    fn node_output_publish_with_trailing_slash_is_the_same_message() {
        let m = ingest(NODE_OUTPUT);
        assert_eq!(m.source(), &mod_a(Some("out1")));
        assert_eq!(m.property("run"), Some("capture-node"));
        assert_eq!(m.property("seq"), Some("0"));
    }

    #[test]
    fn bagless_telemetry_is_a_module_message_without_output() {
        for t in [
            "devices/edgedev/modules/modA/messages/events",
            "devices/edgedev/modules/modA/messages/events/",
        ] {
            let m = ingest(t);
            assert_eq!(m.source(), &mod_a(None));
            assert!(m.properties().is_empty());
            assert!(m.system_properties().is_empty());
        }
    }

    #[test]
    fn python_emitted_system_keys_all_map() {
        let m = ingest("devices/edgedev/modules/modA/messages/events/%24.on=o&%24.mid=m&%24.cid=c&%24.uid=u&%24.ct=t&%24.ce=e&%24.ifid=i&%24.exp=2030-01-01T00%3A00%3A00Z&a=1");
        let s = |p| m.system_property(p);
        assert_eq!(s(SystemProperty::MessageId), Some("m"));
        assert_eq!(s(SystemProperty::CorrelationId), Some("c"));
        assert_eq!(s(SystemProperty::UserId), Some("u"));
        assert_eq!(s(SystemProperty::ContentType), Some("t"));
        assert_eq!(s(SystemProperty::ContentEncoding), Some("e"));
        assert_eq!(s(SystemProperty::InterfaceId), Some("i"));
        assert_eq!(s(SystemProperty::ExpiryTime), Some("2030-01-01T00:00:00Z"));
        assert_eq!(m.properties().len(), 1);
    }

    #[test]
    fn other_ingress_system_keys_map() {
        let m = ingest("devices/edgedev/modules/modA/messages/events/%24.to=x&%24.ctime=t&%24.schema=s&%24.sub=c&iothub-operation=op&ack=full");
        let s = |p| m.system_property(p);
        assert_eq!(s(SystemProperty::To), Some("x"));
        assert_eq!(s(SystemProperty::CreationTime), Some("t"));
        assert_eq!(s(SystemProperty::MessageSchema), Some("s"));
        assert_eq!(s(SystemProperty::ComponentName), Some("c"));
        assert_eq!(s(SystemProperty::Operation), Some("op"));
        assert_eq!(m.property("ack"), Some("full"));
    }

    #[test]
    fn delivery_matches_the_capture_and_both_sdks_can_read_it() {
        let m = ingest(PY_OUTPUT);
        let topic = topics::delivery_topic_and_bag(
            &DeviceId::new("edgedev"),
            &ModuleId::new("modB"),
            &InputName::new("in1"),
            &m,
        )
        .unwrap();
        // The topic the capture's stand-in sent and both SDKs accepted.
        assert_eq!(
            topic,
            "devices/edgedev/modules/modB/inputs/in1/%24.mid=capture-py-0&%24.ct=application%2Fjson&%24.ce=utf-8&run=capture-py&seq=0&%24.cdid=edgedev&%24.cmid=modA"
        );
        assert!(node_dispatches(&topic));
        let (input, props) = python_reads(&topic);
        assert_eq!(input, "in1");
        assert!(props.contains(&("$.cmid".to_owned(), "modA".to_owned())));
        assert!(props.contains(&("$.cdid".to_owned(), "edgedev".to_owned())));
        assert!(!props.iter().any(|(k, _)| k == "$.on"));
    }

    #[test]
    fn edgehub_real_input_topic_decodes() {
        // From azure-iot-sdk-python #713 (reference §1.5).
        let bag = "%24.cdid=MTC0304&%24.cmid=IoTEdgeASA&%24.ce=utf-8&%24.ct=application%2Fjson";
        let d = bag::decode(bag);
        assert_eq!(
            d.system,
            vec![
                (SystemProperty::ContentEncoding, "utf-8".to_owned()),
                (SystemProperty::ContentType, "application/json".to_owned())
            ]
        );
        assert!(d.properties.is_empty(), "connection ids are not properties");
    }

    fn app_key() -> impl Strategy<Value = String> {
        any::<String>().prop_filter("not a hub wire key", |k| !bag::is_reserved_key(k))
    }

    proptest! {
        #[test]
        fn decode_never_panics(s in ".*") {
            let _ = bag::decode(&s);
        }

        #[test]
        fn parse_publish_never_panics(s in "(devices/|\\$iothub/)?[a-z/=&%$.?]{0,40}") {
            if let Ok(InboundTopic::Events(e)) = topics::parse_publish(&s) {
                let _ = bag::decode(e.bag);
            }
        }

        #[test]
        fn delivery_round_trips_every_forwarded_property(
            props in proptest::collection::btree_map(app_key(), any::<String>(), 0..6),
            mid in proptest::option::of(any::<String>()),
            ct in proptest::option::of(any::<String>()),
        ) {
            let mut m = Message::new(mod_a(Some("o")), "b");
            for (k, v) in &props {
                m = m.with_property(k.clone(), v.clone());
            }
            if let Some(mid) = &mid {
                m = m.with_system_property(SystemProperty::MessageId, mid.clone());
            }
            if let Some(ct) = &ct {
                m = m.with_system_property(SystemProperty::ContentType, ct.clone());
            }
            let encoded = bag::encode_for_delivery(&m);
            let topic = topics::input_topic("edgedev", "modB", "in1", &encoded).unwrap();
            prop_assert!(node_dispatches(&topic));
            prop_assert_eq!(topic.matches('/').count(), 6, "the bag adds no level");
            let back = bag::message_from_publish(
                &DeviceId::new("edgedev"), Some(&ModuleId::new("modA")), &encoded, Bytes::new());
            prop_assert_eq!(back.properties(), m.properties());
            prop_assert_eq!(back.system_properties(), m.system_properties());
            let (_, py) = python_reads(&topic);
            let py_props: std::collections::BTreeMap<_, _> = py.into_iter().collect();
            for (k, v) in &props {
                prop_assert_eq!(py_props.get(k), Some(v));
            }
        }
    }
}
