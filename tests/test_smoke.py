def test_ping_round_trip(workers, submitter):
    workers.start("maintenance")
    job = submitter.submit("maintenance.ping", {"message": "hello"})
    envelope = job.result(timeout=30)
    assert envelope["success"] is True
    assert envelope["data"]["pong"] == "hello"
    assert envelope["request_id"] == job.id
